"""`python -m finetune train RECIPE [key.sub=value ...]` and `python -m finetune eval WEIGHTS [key=value ...]`.

    python -m finetune train vit_l16_384 init=export/model.safetensors data.path=shards/dataset.json run.dir=runs/ft
    torchrun --nproc_per_node 8 -m finetune train vit_l16_384 ...        # or: accelerate launch -m finetune train ...
    python -m finetune eval runs/ft/best.safetensors data.path=shards/dataset.json model.image_size=384
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.config import ConfigError, parse_override

EVAL_KEYS = {"data.path": "", "data.split": "val", "model.image_size": 0, "model.pos_interp": "bicubic",
             "eval.micro_batch": 64, "data.workers": 4, "data.crop_pct": 0.875}


def _eval_options(overrides: list[str]) -> dict:
    opts = dict(EVAL_KEYS)
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if key not in opts:
            raise ConfigError(f"unknown eval option {key!r} (valid: {', '.join(EVAL_KEYS)})")
        opts[key] = value
    if not opts["data.path"]:
        raise ConfigError("data.path is required: finetune eval WEIGHTS data.path=shards/dataset.json")
    return opts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="fine-tune pre-trained weights at a new resolution")
    t.add_argument("recipe", help="a recipe name in finetune/recipes (vit_l16_384, debug_cpu, ...) or a YAML path")
    t.add_argument("overrides", nargs="*", help="key.sub=value, e.g. init=model.safetensors run.dir=runs/ft")
    e = sub.add_parser("eval", help="top-1/top-5 of weights at any resolution")
    e.add_argument("weights", help="a weight file (vitscale or timm safetensors) or a pretrain run dir")
    e.add_argument("overrides", nargs="*", help=f"key=value among {', '.join(EVAL_KEYS)}")
    args = p.parse_args(argv)
    try:
        if args.verb == "train":
            from finetune.config import load_finetune_config
            from finetune.train import train

            report = train(load_finetune_config(args.recipe, args.overrides))
            best = report["best"]
            print(json.dumps({"steps": report["steps"], "best_top1": best and best["top1"]}))
        else:
            from finetune.train import evaluate_weights

            o = _eval_options(args.overrides)
            m = evaluate_weights(args.weights, o["data.path"], o["data.split"], o["model.image_size"],
                                 o["eval.micro_batch"], o["data.workers"], o["data.crop_pct"], o["model.pos_interp"])
            print(json.dumps(m))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
