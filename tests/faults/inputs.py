"""Bad configs and files: each CLI refuses them with a one-line error, runs nothing and writes nothing.

Every case runs a real CLI (`python -m pretrain|finetune|launch ...`) against a sandbox folder holding
the bad input. A case passes when the command exits with the expected code, prints exactly one line on
stderr (no traceback) that names the problem, has created no run dir, and left every file of the sandbox
and of the shared dataset as it was. Pickle payloads in checkpoints and YAML `!!python` tags would create a
marker file if they ever ran: it must not exist.

The CLIs run as forks of one warm interpreter (`python -m tests.faults.inputs cli CASES.json`): each case
is its own process running the module's `__main__` with its argv, cwd and a fresh stdout/stderr, exactly as
`python -m` would, without paying the torch + DeepSpeed import once per case.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ROOT
from tests.faults.harness import Ctx, Outcome, scenario

PAYLOAD_TAG = "!!python/object/apply:os.system"


@dataclass
class Case:
    name: str
    argv: list[str]  # after `python -m`
    expect: str  # a fragment the error line must contain (the problem named)
    code: int = 2  # bad input / config / usage
    run_dir: str | None = None  # the run dir the command would write, relative to the sandbox
    run_dir_made: bool = False  # True: the command may create its run dir (its logs) before it refuses the input


class Payload:
    """Unpickling this runs `touch MARKER` (how a malicious checkpoint would run code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_payload_pt(path: Path, marker: Path) -> Path:
    """A torch zip checkpoint whose pickle runs `touch marker` when loaded with weights_only=False."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"w": torch.zeros(2)}, "x": Payload(marker)}, path)
    return path


def _evil_run_dir(sandbox: Path, digits: Path, marker: Path) -> Path:
    """A pretrain run dir (resolved config, `latest`, trainer state) whose model file carries a payload."""
    from pretrain.config import load_pretrain_config
    from runtime.config import save_config

    run = sandbox / "evil-run"
    cfg = load_pretrain_config("debug_cpu", [f"data.path={digits}", f"run.dir={run}", "zero.stage=2"])
    save_config(cfg, run / "config.yaml")
    tag = run / "checkpoints" / "global_step4"
    classes = json.loads(digits.read_text())["classes"]
    tag.mkdir(parents=True)
    from pretrain.train import model_config

    vcfg = model_config(cfg, len(classes))
    (tag / "trainer_state.json").write_text(json.dumps({  # the core's trainer state: all that export needs
        "step": 4, "applied": 4, "skipped": 0, "evals": [], "best_top1": -1.0, "stream": {}, "ema_updates": 0,
        "world_size": 1, "backend": "deepspeed", "class_names": classes, "vit_config": vcfg.to_json(),
        "eval_settings": {"image_size": list(vcfg.image_hw)}}))
    write_payload_pt(tag / "mp_rank_00_model_states.pt", marker)
    (run / "checkpoints" / "latest").write_text("global_step4")
    return run


def _weights(sandbox: Path, marker: Path) -> dict[str, Path]:
    """A vitscale weight file of width 48 (debug is 32), a good debug one and a pickled .pth with a payload."""
    import torch

    from vit import VisionTransformer, vit_config
    from vit.weights import save_weights

    cfg = vit_config("debug", width=48, heads=4)
    wide = save_weights(sandbox / "wide.safetensors", VisionTransformer(cfg).state_dict(), cfg)
    pth = sandbox / "model.pth"
    torch.save({"state_dict": {}, "x": Payload(marker)}, pth, _use_new_zipfile_serialization=False)
    cfg = vit_config("debug", num_classes=10)
    good = save_weights(sandbox / "good.safetensors", VisionTransformer(cfg).state_dict(), cfg)
    return {"wide": wide, "pth": pth, "good": good}


def _bad_files(sandbox: Path, digits: Path, marker: Path) -> tuple[Path, Path]:
    """Recipes and host files carrying a payload, a `latest` naming no checkpoint, a dataset of a newer format:
    returns (the dangling run's checkpoints folder, the newer dataset.json)."""
    (sandbox / "evil.yaml").write_text(f"optim: {{lr: {PAYLOAD_TAG} ['touch {marker}']}}\n")
    (sandbox / "evil_ft.yaml").write_text(f"init: {PAYLOAD_TAG} ['touch {marker}']\n")
    (sandbox / "hosts").write_text(f"node1 slots=1\nnode2;touch${{IFS}}{marker} slots=1\n")
    (sandbox / "hosts_sub").write_text(f"$(touch${{IFS}}{marker}) slots=1\n")
    dangling = sandbox / "dangling-run" / "checkpoints"
    dangling.mkdir(parents=True)
    (dangling / "latest").write_text("global_step8")  # names a checkpoint that was never completed
    v2 = sandbox / "v2" / "dataset.json"
    v2.parent.mkdir()
    v2.write_text(json.dumps({**json.loads(digits.read_text()), "format": "vitscale-shards/2"}))
    return dangling, v2


def build_cases(sandbox: Path, digits: Path, marker: Path) -> list[Case]:
    """The table of bad inputs, their files written into `sandbox`."""
    data = f"data.path={digits}"
    evil = _evil_run_dir(sandbox, digits, marker)
    w = _weights(sandbox, marker)
    dangling, v2 = _bad_files(sandbox, digits, marker)

    def train(stage: str, name: str, *over: str, expect: str) -> Case:  # both stages: exit 2, no run dir made
        return Case(name, [stage, "train", "debug_cpu", data, f"run.dir=run-{name}", *over], expect, 2, f"run-{name}")

    pre, fin, good = functools.partial(train, "pretrain"), functools.partial(train, "finetune"), f"init={w['good']}"

    return [
        pre("negative-lr", "optim.lr=-0.1", expect="optim.lr must be >= 0"),
        pre("batch-arithmetic", "train.global_batch=30", expect="global batch 30 is not divisible"),
        pre("unknown-variant", "model.variant=B/61", expect="unknown ViT variant 'B/61'; did you mean"),
        pre("image-not-patch-multiple", "model.image_size=30", expect="not a multiple of patch size"),
        pre("missing-dataset", "data.path=nowhere/dataset.json", expect="does not exist"),
        pre("dataset-format-v2", f"data.path={v2}", expect="'vitscale-shards/2' is not 'vitscale-shards/1'"),
        pre("unknown-key", "optim.lrr=0.1", expect="unknown config key 'optim.lrr': did you mean 'optim.lr'"),
        pre("wrong-type", "train.steps=ten", expect="train.steps must be int"),
        pre("zero-stage-5", "zero.stage=5", expect="zero.stage must be 0, 1, 2, 3 or auto"),
        pre("precision-literal", "precision=fp8", expect="precision must be one of"),
        pre("override-yaml-tag", f"optim.lr={PAYLOAD_TAG} ['touch {marker}']", expect="python tags are refused"),
        Case("recipe-yaml-tag", ["pretrain", "train", str(sandbox / "evil.yaml"), data, "run.dir=run-tag"],
             "python tags are refused", run_dir="run-tag"),
        Case("finetune-recipe-yaml-tag", ["finetune", "train", str(sandbox / "evil_ft.yaml"), data,
                                          "run.dir=run-ft-tag"], "python tags are refused", run_dir="run-ft-tag"),
        Case("unknown-recipe", ["pretrain", "train", "debug_cpuu", data, "run.dir=run-r"],
             "no recipe 'debug_cpuu': did you mean debug_cpu", run_dir="run-r"),
        Case("resume-pickle-payload", ["pretrain", "train", "debug_cpu", data, f"run.dir={evil}"],
             "posix.system"),
        Case("latest-names-missing-checkpoint", ["pretrain", "train", "debug_cpu", data, f"run.dir={dangling.parent}"],
             "delete `latest` or point it"),
        Case("export-pickle-payload", ["pretrain", "export", str(evil), "--out", "out/model.safetensors"],
             "posix.system", run_dir="out"),
        fin("finetune-from-pickle-run-dir", f"init={evil}", expect="posix.system"),
        fin("finetune-pickled-pth", f"init={w['pth']}", expect="is not a safetensors file"),
        fin("finetune-wrong-width", f"init={w['wide']}", "model.variant=debug",
            expect="width: checkpoint 48 vs debug 32"),
        # the inputs that once gave fine-tuning tracebacks and an empty log.txt: one line now, as in pre-training
        fin("finetune-missing-dataset", good, "data.path=nowhere/dataset.json", expect="does not exist"),
        fin("finetune-image-not-patch-multiple", good, "model.image_size=50", expect="multiple of"),
        fin("finetune-batch-arithmetic", good, "train.global_batch=30", expect="global batch 30 is not divisible"),
        fin("finetune-unknown-key", good, "optim.lrr=0.1", expect="unknown config key 'optim.lrr'"),
        fin("finetune-missing-init", "init=nowhere.safetensors", expect="does not exist"),
        Case("finetune-unknown-recipe", ["finetune", "train", "debug_cpuu", data, good, "run.dir=run-fr"],
             "no recipe 'debug_cpuu'", run_dir="run-fr"),
        Case("eval-missing-weights", ["finetune", "eval", "nowhere.safetensors", data], "no weight file or run dir"),
        Case("eval-missing-data", ["pretrain", "eval", str(w["good"])], "data.path is required"),
        Case("eval-unknown-option", ["pretrain", "eval", str(w["good"]), data, "eval.microbatch=8"],
             "unknown eval option 'eval.microbatch'"),
        Case("eval-pickled-pth", ["finetune", "eval", str(w["pth"]), data], "is not a safetensors file"),
        Case("hostfile-shell-syntax", ["launch", "run", "--hostfile", "hosts", "--", "python", "-m", "pretrain"],
             "is not a valid host name"),
        Case("hostfile-command-substitution", ["launch", "run", "--hostfile", "hosts_sub", "--", "python", "-m",
                                               "pretrain"], "is not a valid host name"),
    ]


def snapshot(*roots: Path) -> dict[str, str]:
    """path -> sha256 of every file (and every folder, as 'dir') under `roots`."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(cases: list[Case], cwd: Path, out: Path) -> list[dict]:
    """Run each case's CLI in its own process (a fork of one warm interpreter); rc, stdout, stderr, seconds."""
    spec = out / "cases.json"
    spec.write_text(json.dumps({"cwd": str(cwd), "cases": [c.argv for c in cases]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.faults.inputs", "cli", str(spec), str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "results.json").read_text())


@scenario("bad-inputs", "bad configs, datasets, weights, hostfiles and pickled checkpoints: one-line error, "
                        "exit 2, nothing run or written, no payload executed")
def bad_inputs(ctx: Ctx) -> Outcome:
    sandbox, marker = ctx.work / "sandbox", ctx.work / "PWNED"
    sandbox.mkdir()
    cases = build_cases(sandbox, ctx.digits, marker)
    if ctx.full:  # the randomised version: the same table in a random order (no case may depend on another)
        ctx.rng.shuffle(cases)
    before = snapshot(sandbox, ctx.digits.parent)
    results = run_cli(cases, sandbox, ctx.work)
    failures, worst = [], 0.0
    for case, r in zip(cases, results, strict=True):
        err = r["stderr"].strip().splitlines()
        why = []
        if r["rc"] != case.code:
            why.append(f"exit {r['rc']} (expected {case.code})")
        if len(err) != 1 or "Traceback" in r["stderr"]:
            why.append(f"{len(err)} stderr lines (expected one)")
        if case.expect not in r["stderr"]:
            why.append(f"error does not name the problem ({case.expect!r})")
        if case.run_dir and not case.run_dir_made and (sandbox / case.run_dir).exists():
            why.append(f"created {case.run_dir}")
        if why:
            failures.append(f"{case.name}: {'; '.join(why)}: {r['stderr'][-600:]!r}")
        worst = max(worst, r["seconds"])
    after = snapshot(sandbox, ctx.digits.parent)
    own = [str(sandbox / c.run_dir) for c in cases if c.run_dir]
    changed = sorted(k for k in before.keys() | after.keys()
                     if before.get(k) != after.get(k) and not any(k == o or k.startswith(o + "/") for o in own))
    assert not marker.exists(), "a pickle payload or YAML tag ran code: the marker file exists"
    assert not failures, "\n".join(failures)
    assert not changed, f"files written or changed outside a run dir: {changed[:10]}"
    return Outcome(data_lost=len(changed), exit_s=worst, detail=f"{len(cases)} bad inputs refused",
                   extra={"cases": len(cases)})


def make_checkpoints(out: str | Path, combos: list[str]) -> None:
    """Real DeepSpeed checkpoints of the trainer's engine, one per "STAGE-PRECISION" combo (e.g. "3-bf16"),
    each after one optimizer step, as OUT/z{combo}/global_step1: what `check_pickles` must accept."""
    import deepspeed
    import torch

    from pretrain.config import load_pretrain_config
    from pretrain.train import model_config
    from runtime.dist import detect, init_distributed
    from trainer.backend_deepspeed import DeepSpeedBackend
    from trainer.loss import classification_loss
    from trainer.optim import param_groups
    from vit import VisionTransformer

    env = init_distributed(detect(), timeout_s=60, single=True)
    deepspeed.init_distributed()
    for combo in combos:
        stage, precision = combo.split("-")
        cfg = load_pretrain_config("debug_cpu", ["data.path=unused", "run.dir=unused", f"zero.stage={stage}",
                                                 f"precision={precision}", "train.global_batch=8"])
        torch.manual_seed(0)
        model = VisionTransformer(model_config(cfg, 10))
        backend = DeepSpeedBackend(model, param_groups(model, cfg.optim.weight_decay), cfg, env)
        x, y = torch.randn(8, 3, 32, 32, dtype=backend.input_dtype), torch.arange(8) % 10
        backend.micro_step(x.to(backend.device), y.to(backend.device),
                           lambda logits, t: classification_loss(logits, t, "softmax", 0.0), boundary=True)
        backend.save(Path(out) / f"z{combo}", "global_step1")
        backend.close()


def _serve(spec_file: str, out_dir: str) -> None:
    """Run each case's `python -m ARGV` in a forked child of this (warm) interpreter; write results.json."""
    import runpy
    import traceback

    import deepspeed  # noqa: F401  (warm: what the CLIs import)

    import finetune.train  # noqa: F401
    import launch.commands  # noqa: F401
    import launch.launchers  # noqa: F401
    import pretrain.train  # noqa: F401
    import trainer.backend_accelerate  # noqa: F401
    import trainer.backend_deepspeed  # noqa: F401
    import trainer.evaluate  # noqa: F401
    import trainer.export  # noqa: F401

    spec, out = json.loads(Path(spec_file).read_text()), Path(out_dir)
    results = []
    for i, argv in enumerate(spec["cases"]):
        files = [out / f"case{i}.{s}" for s in ("out", "err")]
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: what `python -m MODULE ARGS` does, in the sandbox
            code = 1
            try:
                os.chdir(spec["cwd"])
                for fd, f in zip((1, 2), files, strict=True):
                    os.dup2(os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
                sys.argv = [f"{argv[0]}.__main__", *argv[1:]]
                runpy.run_module(f"{argv[0]}.__main__", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                traceback.print_exc()  # as the interpreter does with an uncaught exception
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        results.append({"rc": os.waitstatus_to_exitcode(status), "seconds": time.monotonic() - t0,
                        "stdout": files[0].read_text(), "stderr": files[1].read_text()})
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:2] == ["cli"]:
        _serve(*sys.argv[2:4])
    elif sys.argv[1:2] == ["checkpoints"]:
        make_checkpoints(sys.argv[2], sys.argv[3:])
    else:
        raise SystemExit("usage: python -m tests.faults.inputs cli CASES.json OUT_DIR | checkpoints OUT STAGE-PREC...")
