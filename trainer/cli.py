"""The error contract of every verb of both stages (see docs/architecture.md).

Bad input (a config, path, checkpoint or weight file that cannot be used) is one line on stderr naming the
problem and the fix, exit 2, raised before any process group or run directory is made. A run that stops
for a reason it explains (non-finite steps, a failed checkpoint write) is one line too, exit 1; so is Ctrl-C
outside the training loop (or a second one in it), exit 130.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

from runtime.config import ConfigError, flatten, load_config, resolved_yaml, to_dict, yaml_text
from runtime.config_schema import config_fields

EXIT_BAD_INPUT, EXIT_STOPPED = 2, 1


def run_verb(fn: Callable[[], object]) -> int:
    """Run one verb under the error contract; returns the process exit code."""
    from runtime.io import say
    from trainer.errors import CheckpointError, NonFiniteLoss

    try:
        fn()
    except (ConfigError, FileNotFoundError) as err:  # FileNotFoundError: a path that vanished since preflight
        say(f"error: {err}", sys.stderr)
        return EXIT_BAD_INPUT
    except (NonFiniteLoss, CheckpointError) as err:  # a clear stop, not a traceback: say why and what to do
        say(f"error: {err}", sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one in it (the first one stops the
        # loop after a checkpoint: trainer/preempt.py)
        from trainer.preempt import EXIT_AFTER_SIGNAL

        say("interrupted (Ctrl-C); a training run resumes from its last checkpoint when the same command is rerun",
            sys.stderr)
        return EXIT_AFTER_SIGNAL[signal.SIGINT]
    return 0


def config_table(cfg: object) -> str:
    """Every key of a resolved config: value, type and default, `*` marking a value that is not the default."""
    values = {k: yaml_text(v) for k, v in flatten(to_dict(cfg)).items()}
    rows = [("*" if values[r["key"]] != r["default"] else " ", r["key"], values[r["key"]], r["type"], r["default"])
            for r in config_fields(type(cfg))]
    head = (" ", "key", "value", "type", "default")
    widths = [min(max(len(row[i]) for row in [head, *rows]), 36) for i in range(4)]  # a long list overflows
    lines = [" ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + " " + row[4] for row in [head, *rows]]
    return "\n".join(line.rstrip() for line in lines) + "\n* differs from the default"


def show_config(cls: type, recipes_dir: Path, validate: Callable, recipe: str, overrides: list[str],
                as_yaml: bool) -> None:
    """The `config` verb: print the resolved config (a table, or `as_yaml` only the YAML, loadable as a recipe).
    What `train` would still refuse (a required key left to the command line) is a note on stderr."""
    cfg = load_config(cls, recipe, overrides, recipes_dir=recipes_dir)
    print(resolved_yaml(cfg) if as_yaml else config_table(cfg), end="" if as_yaml else "\n")
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"note: `train` would refuse it as it is: {err}", file=sys.stderr)


def _add_config_verb(sub, recipes: str) -> None:
    c = sub.add_parser("config", help="print the resolved config: every key, its value, type and default")
    c.add_argument("recipe", help=f"a recipe name in {recipes} or a YAML path")
    c.add_argument("overrides", nargs="*", help="key.sub=value, as for train")
    c.add_argument("--yaml", action="store_true", help="print only the resolved YAML (usable as a recipe)")


def _parser(prog: str, doc: str, recipes: str, with_config: bool):
    """The stage CLI's parser and its subparsers (the stage may add its own verbs to them)."""
    import argparse

    from runtime.progress import add_progress_flag

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train (or resume) from a recipe")
    t.add_argument("recipe", help=f"a recipe name in {recipes} (debug_cpu, ...) or a YAML path")
    t.add_argument("overrides", nargs="*", help="key.sub=value, e.g. run.dir=runs/x data.path=shards/dataset.json")
    t.add_argument("--allow-changed", action="store_true", help="resume even if the config changed a key that exact "
                   "resume depends on (seed, batch, data...; listed in trainer/checkpoint.py): not sample-exact")
    if with_config:
        _add_config_verb(sub, recipes)
    e = sub.add_parser("export", help="a run's checkpoint -> a safetensors weight file (or a timm / hf folder)")
    e.add_argument("run_dir")
    e.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    e.add_argument("--out", default=None, help="a .safetensors file, default RUN_DIR/export/model.safetensors (hf, "
                   "timm-dir: a folder, default RUN_DIR/export/hf/, RUN_DIR/export/timm/)")
    e.add_argument("--ema", action="store_true", help="export the EMA weights")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    e.add_argument("--format", dest="fmt", choices=["vitscale", "timm", "timm-dir", "hf"], default="vitscale",
                   help="vitscale: timm tensor names + our metadata (timm loads it strictly); timm: the same, refused "
                   "for models timm's ViT cannot hold (tanh pre-logits); timm-dir: a timm model folder "
                   "(timm.create_model('local-dir:DIR', pretrained=True), with the eval transform); hf: a "
                   "transformers ViT folder")
    e.add_argument("--timm", action="store_true", help="same as --format timm")
    add_progress_flag(e)
    v = sub.add_parser("eval", help="top-1/top-5 of a weight file or run dir, with its own eval settings")
    v.add_argument("weights", help="a weight file or a run dir (its latest checkpoint)")
    v.add_argument("overrides", nargs="*", help="data.path=... (required), data.split=val, model.image_size=, "
                   "eval.micro_batch=, eval.precision=, data.crop_pct=")
    add_progress_flag(v)
    return p, sub


def stage_main(prog: str, doc: str, recipes: str, train: Callable[[str, list[str], bool], dict],
               argv: list[str] | None = None, extra: Callable | None = None,
               config: Callable[[], tuple[type, Path, Callable]] | None = None) -> int:
    """The CLI every stage has: `train RECIPE [k=v ...] [--allow-changed]`, `config RECIPE [k=v ...] [--yaml]`,
    `export RUN_DIR [...]`, `eval WEIGHTS [k=v ...]`.

    `train(recipe, overrides, allow_changed)` loads the stage's config and runs it. `config()` returns the
    stage's (config class, recipes folder, validate). `extra(subparsers)` adds a stage's own verbs and returns
    {verb: run(args)}.
    """
    import json

    from runtime.progress import apply_progress_flag

    p, sub = _parser(prog, doc, recipes, config is not None)
    own = extra(sub) if extra else {}
    args, rest = p.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest  # key=value overrides after the options
    elif rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")

    apply_progress_flag(args)

    def verb() -> None:
        if args.verb in own:
            own[args.verb](args)
        elif args.verb == "config":
            show_config(*config(), args.recipe, args.overrides, args.yaml)
        elif args.verb == "train":
            report = train(args.recipe, args.overrides, args.allow_changed)
            from runtime.dist import detect  # after: a bad config fails before torch loads

            if detect().is_main:  # one summary line per job, not per rank
                best = report["best"]
                print(json.dumps({"steps": report["steps"], "best_top1": best and best["top1"]}))
        elif args.verb == "export":
            from trainer.export import export

            print(export(args.run_dir, args.out, args.tag, args.ema, args.dtype, args.timm, args.fmt))
        else:
            from trainer.evaluate import evaluate_weights

            print(json.dumps(evaluate_weights(args.weights, args.overrides)))

    return run_verb(verb)


def fewshot_verbs(sub) -> dict:
    """The stage CLI's `fewshot` and `linear-probe` verbs (for trainer.cli.stage_main's `extra=`)."""
    from runtime.progress import add_progress_flag

    for verb, text in (("fewshot", "few-shot linear top-1 (closed-form ridge on frozen pre-logits, big_vision's "
                        "fewshot_lsr) of a weight file on a dataset"),
                       ("linear-probe", "the same ridge on the features of the whole training split")):
        v = sub.add_parser(verb, help=text)
        v.add_argument("weights", help="a vitscale weight file or a run dir (its latest checkpoint)")
        v.add_argument("overrides", nargs="*", help="data.path=... (required), shots=1,5,10, seeds=3, holdout=2, "
                       "out=F.json, data.train_split=, data.val_split=, model.image_size=, eval.micro_batch=")
        add_progress_flag(v)

    def run(args, probe: bool = False) -> dict:  # torch is imported only when the verb runs
        from trainer.fewshot_cli import fewshot_verb

        return fewshot_verb(args.weights, args.overrides, probe=probe)

    return {"fewshot": run, "linear-probe": lambda a: run(a, probe=True)}
