"""`python -m pretrain train|export|eval`: DeepSpeed ZeRO pre-training of a ViT.

  python -m pretrain train RECIPE [key.sub=value ...]        (under deepspeed, torchrun or srun)
  python -m pretrain export RUN_DIR [--tag T] [--out F] [--ema] [--dtype bf16|fp32] [--timm]
  python -m pretrain eval RUN_DIR_OR_WEIGHTS data.path=.../dataset.json [key=value ...]
"""

from __future__ import annotations

from trainer.cli import stage_main


def _train(recipe: str, overrides: list[str]) -> dict:
    from pretrain.config import load_pretrain_config
    from pretrain.train import train

    return train(load_pretrain_config(recipe, overrides))


def main(argv: list[str] | None = None) -> int:
    return stage_main("python -m pretrain", __doc__, "pretrain/recipes", _train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
