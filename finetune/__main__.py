"""`python -m finetune train|export|eval`: fine-tune pre-trained weights at a new resolution (Accelerate).

    python -m finetune train vit_l16_384 init=export/model.safetensors data.path=shards/dataset.json run.dir=runs/ft
    torchrun --nproc_per_node 8 -m finetune train vit_l16_384 ...        # or: accelerate launch -m finetune train ...
    python -m finetune eval runs/ft/best.safetensors data.path=shards/dataset.json
    python -m finetune config vit_l16_384 [key=value ...] [--yaml]     (the resolved config; no training)
    python -m finetune fewshot WEIGHTS data.path=DATASET [shots=1,5,10]     (or linear-probe; trainer/fewshot_cli.py)
"""

from __future__ import annotations

from trainer.cli import stage_main


def _train(recipe: str, overrides: list[str], allow_changed: bool = False) -> dict:
    from finetune.config import load_finetune_config

    cfg = load_finetune_config(recipe, overrides)  # a bad key or value fails before torch loads
    from finetune.train import train

    return train(cfg, allow_changed)


def _config():
    """For the `config` verb: the config class, the recipes folder, the validation `train` applies."""
    from finetune.config import RECIPES_DIR, FinetuneConfig, validate

    return FinetuneConfig, RECIPES_DIR, validate


def main(argv: list[str] | None = None) -> int:
    from trainer.cli import fewshot_verbs

    return stage_main("python -m finetune", __doc__, "finetune/recipes", _train, argv, config=_config,
                      extra=fewshot_verbs)


if __name__ == "__main__":
    raise SystemExit(main())
