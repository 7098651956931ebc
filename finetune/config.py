"""The fine-tuning config: the core's sections (trainer/config.py) plus `init=`, the model at its new
resolution, precision and Accelerate's DeepSpeed plugin. YAML recipes in `finetune/recipes/` map onto it.

    python -m finetune train vit_l16_384 init=export/model.safetensors data.path=shards/dataset.json run.dir=runs/ft

`init` is a vitscale weight file, a timm ViT state dict (safetensors) or a training run dir.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from runtime.config import ConfigError, load_config
from trainer.config import ModelCfg, TrainerConfig, model_problems, validate_common

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class FinetuneModelCfg(ModelCfg):
    pos_interp: Literal["bicubic", "bilinear"] = "bicubic"  # how the position embeddings are resampled


@dataclass
class PluginCfg:
    zero_stage: int = 0  # 0 = plain data parallel; 2 = Accelerate's DeepSpeed plugin with ZeRO-2 (GPUs, for L/H)
    offload_optimizer: bool = False  # with zero_stage 2: keep optimizer state on the CPU


@dataclass
class FinetuneConfig(TrainerConfig):
    init: str = ""  # pre-trained weights: weight file, timm safetensors, or a training run dir
    model: FinetuneModelCfg = field(default_factory=FinetuneModelCfg)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype of the forward/backward (weights stay fp32)
    deepspeed: PluginCfg = field(default_factory=PluginCfg)


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check required keys and ranges; raise ConfigError naming each problem and its fix."""
    problems = validate_common(cfg) + model_problems(cfg.model)
    problems += [f"{k} is required (set it in the recipe or as {k}=...)" for k, v in
                 {"init": cfg.init, "model.image_size": cfg.model.image_size}.items() if not v]
    if cfg.deepspeed.zero_stage not in (0, 2):
        problems.append(f"deepspeed.zero_stage must be 0 (plain data parallel) or 2, got {cfg.deepspeed.zero_stage}")
    if problems:
        raise ConfigError("bad fine-tuning config:\n  " + "\n  ".join(problems))
    return cfg


def load_finetune_config(recipe: str, overrides: list[str] = ()) -> FinetuneConfig:
    """Read a recipe (name in finetune/recipes or a YAML path), apply overrides, validate."""
    return validate(load_config(FinetuneConfig, recipe, list(overrides), recipes_dir=RECIPES_DIR))
