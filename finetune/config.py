"""The fine-tuning recipe schema (DESIGN contract 4): YAML recipes in `finetune/recipes/` map onto these.

    python -m finetune train vit_l16_384 init=export/model.safetensors data.path=shards/dataset.json run.dir=runs/ft

`init` is a vitscale weight file, a timm ViT state dict (safetensors) or a pretrain run dir.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.stream import DataCfg
from runtime.config import ConfigError, load_config

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass
class RunCfg:
    dir: str = ""  # run dir: config.yaml, checkpoints/, tb/, log.txt, best/last.safetensors, report.json
    seed: int = 0  # seeds the initial weights, the data order and the augmentations
    resume: bool = True  # continue from run.dir/checkpoints/latest when it exists



@dataclass
class ModelCfg:
    variant: str = ""  # expected architecture (L/16, H/14, ...); "" = whatever the checkpoint holds
    image_size: int | tuple[int, int] = 0  # fine-tuning resolution; (h, w) allowed
    pos_interp: Literal["bicubic", "bilinear"] = "bicubic"  # how the position embeddings are resampled
    dropout: float = 0.0  # dropout after attention/MLP projections and on the embeddings
    drop_path: float = 0.0  # stochastic-depth rate of the last block (linear from 0 over depth)
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    compile: bool = False  # torch.compile the model (GPU)


@dataclass
class OptimCfg:
    name: Literal["sgd", "adamw"] = "sgd"  # SGD with momentum (the paper) or AdamW (MAE-style recipes)
    lr: float = 0.01  # peak learning rate at the global batch, reached after warm-up
    min_lr: float = 0.0  # learning rate at the end of the decay
    momentum: float = 0.9  # sgd
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    weight_decay: float = 0.0  # weight decay; not applied to biases, norms, pos-embed, cls token
    layer_decay: float = 1.0  # layer-wise LR decay: block i of L gets lr * decay^(L - i); 1 = off
    clip: float = 1.0  # global gradient-norm clip (0 = off)
    warmup_steps: int = 500  # linear warm-up from ~0 to lr, in optimizer steps
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up, to min_lr


@dataclass
class TrainCfg:
    steps: int | None = None  # duration: exactly one of steps, epochs, samples
    epochs: float | None = None  # duration in passes over the train split (fractions allowed)
    samples: int | None = None  # duration in images seen
    global_batch: int = 0  # images per optimizer step over all ranks = micro_batch x accumulation x world size
    micro_batch: int = 0  # images per rank per forward/backward
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off (with mixup: one of the two per batch)
    ema_decay: float = 0.0  # Polyak/EMA of the weights (paper: 0.9999); 0 = off


@dataclass
class EvalCfg:
    every: int = 0  # steps between evaluations; 0 = at every epoch end (and always at the end)
    micro_batch: int | None = None  # None: train.micro_batch


@dataclass
class LogCfg:
    every: int = 50  # optimizer steps between reading the loss on the host
    peak_tflops: float | None = None  # per device, for MFU; None: from the device name


@dataclass
class CheckpointCfg:
    every: int = 0  # optimizer steps; 0 = at every epoch end (and always at the end)
    keep: int = 2  # newest checkpoints kept


@dataclass
class DeepSpeedCfg:
    zero_stage: int = 0  # 0 = plain data parallel; 2 = Accelerate's DeepSpeed plugin with ZeRO-2 (for L/H)
    offload_optimizer: bool = False  # with zero_stage 2: keep optimizer state on the CPU


@dataclass
class FinetuneConfig:
    init: str = ""  # pre-trained weights: weight file, timm safetensors, or pretrain run dir
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"  # autocast dtype of the forward/backward (weights stay fp32)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check required keys and ranges; raise ConfigError naming each problem and its fix."""
    problems = []
    required = {"init": cfg.init, "data.path": cfg.data.path, "run.dir": cfg.run.dir,
                "train.global_batch": cfg.train.global_batch, "train.micro_batch": cfg.train.micro_batch,
                "model.image_size": cfg.model.image_size}
    problems += [f"{k} is required (set it in the recipe or as {k}=...)" for k, v in required.items() if not v]
    durations = [k for k in ("steps", "epochs", "samples") if getattr(cfg.train, k) is not None]
    if len(durations) != 1:
        problems.append(f"give exactly one of train.steps, train.epochs, train.samples (got {durations or 'none'})")
    for key, value in (("optim.lr", cfg.optim.lr), ("optim.weight_decay", cfg.optim.weight_decay),
                       ("optim.warmup_steps", cfg.optim.warmup_steps), ("optim.clip", cfg.optim.clip)):
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    if not 0 < cfg.optim.layer_decay <= 1:
        problems.append(f"optim.layer_decay must be in (0, 1], got {cfg.optim.layer_decay}")
    if not 0 <= cfg.train.label_smoothing < 1:
        problems.append(f"train.label_smoothing must be in [0, 1), got {cfg.train.label_smoothing}")
    if not 0 <= cfg.train.ema_decay < 1:
        problems.append(f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}")
    if cfg.deepspeed.zero_stage not in (0, 2):
        problems.append(f"deepspeed.zero_stage must be 0 (plain data parallel) or 2, got {cfg.deepspeed.zero_stage}")
    if problems:
        raise ConfigError("bad fine-tuning config:\n  " + "\n  ".join(problems))
    return cfg


def load_finetune_config(recipe: str, overrides: list[str] = ()) -> FinetuneConfig:
    """Read a recipe (name in finetune/recipes or a YAML path), apply overrides, validate."""
    return validate(load_config(FinetuneConfig, recipe, list(overrides), recipes_dir=RECIPES_DIR))
