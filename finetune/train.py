"""`python -m finetune train`: the core's loop on the Accelerate backend, from pre-trained weights.

Fine-tuning is configuration plus loading: the `init=` weights (a weight file, timm safetensors or a training
run dir) are loaded at the new resolution with the position embeddings resampled and a new zero-initialised
head, the loading contract asserted (finetune/load.py). The step loop, checkpoints, eval (of the EMA when
enabled), best/last weight files and logging are the core's (trainer/, see docs/architecture.md).
"""

from __future__ import annotations

import importlib.util

import torch

from finetune.config import FinetuneConfig
from finetune.load import build_finetune_model, finetune_config, read_init
from runtime.config import ConfigError
from trainer.run import Built, Stage
from trainer.run import train as run_training
from vit.config import vit_config


def build_model(cfg: FinetuneConfig, names: list[str]) -> Built:
    """The fine-tuning model from `init=`: body loaded, pos-embed resampled, zero-init head for `names`; and the
    normalisation and resize filter the init was fed with, where it records them (the run feeds its inputs the
    same way unless data.* says otherwise)."""
    heads = vit_config(cfg.model.variant).heads if cfg.model.variant else None
    init = read_init(cfg.init, heads=heads)
    src = init.config
    vcfg = finetune_config(src, image_size=cfg.model.image_size, num_classes=len(names), variant=cfg.model.variant,
                           dropout=cfg.model.dropout, drop_path=cfg.model.drop_path)
    model = build_finetune_model(init.state_dict, src, vcfg, mode=cfg.model.pos_interp)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    settings = init.eval_settings
    note = (f"init {cfg.init}: grid {src.grid} -> {vcfg.grid} ({cfg.model.pos_interp}), new head for {len(names)} "
            "classes")
    if settings is None:
        return Built(model, vcfg, note)
    return Built(model, vcfg, note, (settings.mean, settings.std), settings.interpolation)


def _check_plugin(cfg: FinetuneConfig) -> None:
    """Accelerate's DeepSpeed plugin needs GPUs and `transformers`: say so before anything starts."""
    if not cfg.deepspeed.zero_stage:
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} uses Accelerate's DeepSpeed plugin, which "
                          "needs GPUs; use deepspeed.zero_stage=0 (plain data parallel) on this machine")
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError("deepspeed.zero_stage=2 uses Accelerate's DeepSpeed plugin, which needs the `transformers` "
                          "package: pip install transformers (or set deepspeed.zero_stage=0)")


def train(cfg: FinetuneConfig, allow_changed: bool = False) -> dict:
    """Fine-tune as `cfg` says (resuming from run.dir/checkpoints/latest if there); returns the report.
    `allow_changed`: `train --allow-changed`."""
    from trainer.backend_accelerate import AccelerateBackend  # imports accelerate: only when training

    _check_plugin(cfg)
    stage = Stage("finetune", lambda names: build_model(cfg, names), AccelerateBackend, AccelerateBackend.name,
                  report={"init": cfg.init})
    return run_training(cfg, stage, allow_changed)
