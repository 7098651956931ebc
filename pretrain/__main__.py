"""`python -m pretrain train|export|eval`: DeepSpeed ZeRO pre-training of a ViT.

  python -m pretrain train RECIPE [key.sub=value ...]        (under deepspeed, torchrun or srun)
  python -m pretrain export RUN_DIR [--tag T] [--out F] [--ema] [--dtype bf16|fp32] [--timm]
  python -m pretrain eval RUN_DIR_OR_WEIGHTS data.path=.../dataset.json [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys

from runtime.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train (or resume) from a recipe")
    t.add_argument("recipe", help="a name in pretrain/recipes (debug_cpu, vit_l16_in21k, ...) or a YAML path")
    t.add_argument("overrides", nargs="*", help="key.sub=value")
    e = sub.add_parser("export", help="consolidate a run's checkpoint into model.safetensors")
    e.add_argument("run_dir")
    e.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    e.add_argument("--out", default=None, help="default: RUN_DIR/export/model.safetensors")
    e.add_argument("--ema", action="store_true", help="export the EMA weights")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    e.add_argument("--timm", action="store_true", help="write timm key names")
    v = sub.add_parser("eval", help="top-1/top-5 of weights or a run dir")
    v.add_argument("source")
    v.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        if args.verb == "train":
            from pretrain.checkpoint import CheckpointError
            from pretrain.config import load_pretrain_config
            from pretrain.train import NonFiniteLoss, train

            cfg = load_pretrain_config(args.recipe, args.overrides)
            try:
                train(cfg)
            except (NonFiniteLoss, CheckpointError) as err:  # a clear stop, not a traceback: say why and what to do
                print(f"error: {err}", file=sys.stderr, flush=True)
                return 1
        elif args.verb == "export":
            from pretrain.export import export

            print(export(args.run_dir, args.out, args.tag, args.ema, args.dtype, args.timm))
        else:
            from pretrain.export import evaluate_weights

            print(json.dumps(evaluate_weights(args.source, args.overrides)))
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
