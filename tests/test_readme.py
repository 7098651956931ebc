"""Every vitscale command shown in README.md is real: its verb and flags exist (checked against the verb's own
`--help`), and the `key.sub=value` overrides of each `train` command are valid keys of that stage's config.

The commands that run on this machine run elsewhere in the suite (`make demo` in tests/test_demo.py, the
data_prep verbs in tests/test_data_prep_*.py); cluster commands (multi-node, SLURM) are checked here for
existence and spelling only.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import re
import shlex

import pytest

from tests.conftest import ROOT

PACKAGES = ("data_prep", "pretrain", "finetune", "launch", "runtime", "vit")


def readme_commands() -> list[list[str]]:
    """Each shell line of README.md's bash blocks (continuations joined) that runs `-m <package>`, as argv
    from the package name on."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            argv = [x for w in shlex.split(line, comments=True) for x in (shlex.split(w) if " " in w else [w])]
            for i, word in enumerate(argv[:-1]):
                if word == "-m" and argv[i + 1] in PACKAGES:
                    commands.append(argv[i + 1:])
                    if "--" in argv[i + 1:]:  # a launch command: the job after `--` is a command too
                        job = argv[argv.index("--", i) + 1:]
                        if "-m" in job and job[job.index("-m") + 1] in PACKAGES:
                            commands.append(job[job.index("-m") + 1:])
                    break
    return commands


def _help(package: str, verb: str) -> str:
    main = importlib.import_module(f"{package}.__main__").main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([verb, "--help"])
    return out.getvalue()


def _overrides(words: list[str]) -> list[str]:
    return [w for w in words if re.fullmatch(r"[a-z_]+(\.[a-z_]+)*=.*", w)]


def test_the_readme_shows_each_stage() -> None:
    verbs = {(c[0], c[1]) for c in readme_commands()}
    for want in [("data_prep", "write"), ("data_prep", "verify"), ("data_prep", "merge"), ("pretrain", "train"),
                 ("pretrain", "export"), ("finetune", "train"), ("finetune", "eval"), ("launch", "run"),
                 ("launch", "sbatch"), ("runtime", "dist-check")]:
        assert want in verbs, want


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a[:2]))
def test_command_verb_flags_and_overrides_exist(argv: list[str]) -> None:
    package, verb, rest = argv[0], argv[1], argv[2:]
    assert importlib.util.find_spec(f"{package}.__main__") is not None, f"`python -m {package}` is not in this tree"
    rest = rest[: rest.index("--")] if "--" in rest else rest
    help_text = _help(package, verb)
    for flag in (w.split("=")[0] for w in rest if w.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), f"{package} {verb}: no {flag}"
    if verb == "train" and package in ("pretrain", "finetune"):
        config = importlib.import_module(f"{package}.config")
        load = getattr(config, f"load_{package}_config")
        positional = [w for w in rest if not w.startswith("-") and "=" not in w]
        cfg = load(positional[0], _overrides(rest) + (["init=x"] if package == "finetune" and "init" not in
                                                      " ".join(rest) else []) + ["data.path=x", "run.dir=x"])
        assert cfg is not None
