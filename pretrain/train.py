"""`python -m pretrain train`: the core's loop on the DeepSpeed backend, with a pre-training head.

Pre-training is configuration plus a freshly initialised model (seeded, identical on every rank); the step
loop, checkpoints, eval and logging are the core's (trainer/, see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses

from pretrain.plan import gpu_memory_gib, resolve_zero
from runtime.config import ConfigError
from runtime.logs import get_logger
from trainer.run import Built, Stage
from trainer.run import train as run_training
from vit import VisionTransformer, ViTConfig, vit_config


def model_config(cfg, num_classes: int) -> ViTConfig:
    """The pre-training model: the variant at the training size, with the paper's (optional) tanh head."""
    m = cfg.model
    try:
        return vit_config(m.variant, image_size=m.image_size, num_classes=num_classes,
                          representation_size=m.representation_size, dropout=m.dropout, drop_path=m.drop_path)
    except ValueError as err:  # unknown variant, image size not a multiple of the patch size
        raise ConfigError(str(err)) from err


def build_model(cfg, names: list[str]) -> Built:
    """A freshly initialised model (the seed is set by the core) with a head for `names`."""
    vcfg = model_config(cfg, len(names))
    model = VisionTransformer(vcfg)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return Built(model, vcfg, f"new ViT {cfg.model.variant}, seed {cfg.run.seed}")


def backend(model, groups, cfg, env, universal: bool):
    """The DeepSpeed backend, with `auto` ZeRO settings resolved for this job's GPUs (and the choice logged)."""
    from trainer.backend_deepspeed import DeepSpeedBackend

    zero, line = resolve_zero(cfg, model.cfg, env.local_world_size, env.num_nodes,
                              gpu_memory_gib(env.local_rank, env.local_world_size))
    if line:
        get_logger().info(line)
    return DeepSpeedBackend(model, groups, dataclasses.replace(cfg, zero=zero), env, universal)


def train(cfg, allow_changed: bool = False) -> dict:
    """Run (or resume) pre-training as configured; returns the report. `allow_changed`: `train --allow-changed`."""
    model_config(cfg, 1)  # bad variant/size: one line, before anything is started or written
    return run_training(cfg, Stage("pretrain", lambda names: build_model(cfg, names), backend, "deepspeed"),
                        allow_changed)
