"""The pre-training config: the core's sections (trainer/config.py) plus the model with its pre-training head,
ZeRO and precision. YAML recipes in `pretrain/recipes/` map onto it (see docs/architecture.md).

Required keys have no usable default and are checked by `validate`: data.path, run.dir, one of
train.steps / train.epochs / train.samples, train.global_batch, train.micro_batch, model.variant,
model.image_size, precision. `zero.stage=auto` (the default) is resolved at start (pretrain/plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.config import ConfigError, load_config
from trainer.config import ModelCfg, TrainerConfig, model_problems, validate_common

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class PretrainModelCfg(ModelCfg):
    representation_size: int | None = None  # the paper's tanh pre-logits layer width (None = linear head)


@dataclass
class ZeroCfg:
    stage: int | Literal["auto"] = "auto"  # ZeRO 0-3 (1 shards optimizer state, 2 gradients, 3 weights); auto: fits
    offload_optimizer: bool = False  # keep optimizer state (and its step) on the CPU
    offload_params: bool = False  # stage 3 only
    overlap_comm: bool | Literal["auto"] = "auto"  # overlap gradient reduction with the backward; auto: unless compiled
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced (less fragmentation)
    reduce_bucket_size: int | Literal["auto"] = "auto"  # elements per gradient reduce bucket; auto: sized to the model
    allgather_bucket_size: int | Literal["auto"] = "auto"  # elements per parameter all-gather bucket; auto: as above


@dataclass
class DeepSpeedCfg:
    config: str | None = None  # a user's DeepSpeed JSON, overlaid on the generated config


@dataclass
class PretrainConfig(TrainerConfig):
    model: PretrainModelCfg = field(default_factory=PretrainModelCfg)
    zero: ZeroCfg = field(default_factory=ZeroCfg)
    precision: Literal["bf16", "fp16", "fp32", ""] = ""  # bf16, fp16 (dynamic loss scaling) or fp32
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check the required keys and value ranges; raise ConfigError naming each problem and its fix."""
    problems = validate_common(cfg) + model_problems(cfg.model)
    required = {"model.variant": cfg.model.variant, "model.image_size": cfg.model.image_size,
                "precision": cfg.precision}
    problems += [f"{k} is required (set it in the recipe or as {k}=...)" for k, v in required.items() if not v]
    if cfg.model.representation_size is not None and cfg.model.representation_size < 1:
        problems.append(f"model.representation_size must be >= 1 (the pre-logits width) or null (a linear head), "
                        f"got {cfg.model.representation_size}")
    if cfg.zero.stage not in (0, 1, 2, 3, "auto"):
        problems.append(f"zero.stage must be 0, 1, 2, 3 or auto, got {cfg.zero.stage}")
    if cfg.train.ema_decay and cfg.zero.stage == 3:
        problems.append("train.ema_decay needs full parameters on every rank: use zero.stage <= 2 (or auto, which "
                        "then stops at 2) or ema_decay=0")
    problems += [f"zero.{k} must be auto or >= 1 elements, got {v}" for k, v in (
        ("reduce_bucket_size", cfg.zero.reduce_bucket_size), ("allgather_bucket_size", cfg.zero.allgather_bucket_size))
        if v != "auto" and v < 1]  # else DeepSpeed's own traceback in every rank, after the run dir was made
    if cfg.zero.offload_params and cfg.zero.stage != 3:
        problems.append("zero.offload_params needs zero.stage=3")
    if cfg.deepspeed.config and not Path(cfg.deepspeed.config).is_file():
        problems.append(f"deepspeed.config {cfg.deepspeed.config} does not exist; pass a DeepSpeed JSON file")
    if problems:
        raise ConfigError("bad pre-training config:\n  " + "\n  ".join(problems))
    return cfg


def load_pretrain_config(recipe: str, overrides: list[str] = ()) -> PretrainConfig:
    """Read a recipe (name in pretrain/recipes or a YAML path), apply overrides, validate."""
    return validate(load_config(PretrainConfig, recipe, list(overrides), recipes_dir=RECIPES_DIR))
