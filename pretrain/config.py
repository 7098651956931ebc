"""The pre-training recipe schema (DESIGN contract 4): YAML recipes in `pretrain/recipes/` map onto these.

Required keys have no usable default and are checked by `validate`: data.path, run.dir, one of
train.steps / train.epochs / train.samples, train.global_batch, train.micro_batch, model.variant,
model.image_size, zero.stage, precision.
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
    dir: str = ""  # run dir: config.yaml, checkpoints/, tb/, log.txt, export/
    seed: int = 0  # seeds the initial weights, the data order and the augmentations



@dataclass
class ModelCfg:
    variant: str = ""  # B/16, L/16, H/14, ..., debug
    image_size: int = 0  # training resolution in pixels (square)
    num_classes: int | None = None  # None: from the dataset's class list
    representation_size: int | None = None  # the paper's tanh pre-logits layer width (None = linear head)
    dropout: float = 0.0  # dropout after attention/MLP projections and on the embeddings
    drop_path: float = 0.0  # stochastic-depth rate of the last block (linear from 0 over depth)
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    compile: bool = False  # torch.compile the model (GPU)


@dataclass
class OptimCfg:
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    min_lr: float = 0.0  # learning rate at the end of the decay
    weight_decay: float = 0.03  # decoupled (AdamW) weight decay; not applied to biases, norms, pos-embed, cls token
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    clip: float = 1.0  # global gradient-norm clip (0 = off)
    warmup_steps: int = 10_000  # linear warm-up from ~0 to lr, in optimizer steps
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warm-up, to min_lr


@dataclass
class TrainCfg:
    steps: int | None = None  # duration: exactly one of steps, epochs, samples
    epochs: float | None = None  # duration in passes over the train split (fractions allowed)
    samples: int | None = None  # duration in images seen
    global_batch: int = 0  # images per optimizer step over all ranks = micro_batch x accumulation x world size
    micro_batch: int = 0  # images per rank per forward/backward
    loss: Literal["softmax", "sigmoid"] = "softmax"  # softmax cross-entropy, or per-class sigmoid (BCE)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup: float = 0.0  # Beta(alpha, alpha); 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha); 0 = off (with mixup: one of the two per batch)
    ema_decay: float = 0.0  # 0 = no EMA
    max_bad_steps: int = 10  # stop after this many consecutive non-finite steps


@dataclass
class ZeroCfg:
    stage: int = -1  # DeepSpeed ZeRO stage 0-3: 1 shards optimizer state, 2 also gradients, 3 also weights
    offload_optimizer: bool = False  # keep optimizer state (and its step) on the CPU
    offload_params: bool = False  # stage 3 only
    overlap_comm: bool = True  # overlap gradient reduction with the backward pass
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are produced (less fragmentation)
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduce-scatter/all-reduce bucket
    allgather_bucket_size: int = 500_000_000  # elements per parameter all-gather bucket


@dataclass
class EvalCfg:
    every: int = 1000  # steps; 0 = only at the end
    micro_batch: int | None = None  # None: train.micro_batch


@dataclass
class LogCfg:
    every: int = 50  # steps between reading the loss on the host
    peak_tflops: float | None = None  # per device, for MFU; None: from the device name


@dataclass
class CheckpointCfg:
    every: int = 1000  # steps; 0 = only at the end
    keep: int = 3  # newest checkpoints kept
    signal_check_every: int = 10  # steps between the ranks agreeing on a SIGTERM/SIGUSR1 (preemption)


@dataclass
class DeepSpeedCfg:
    config: str | None = None  # a user's DeepSpeed JSON, overlaid on the generated config


@dataclass
class DistCfg:
    timeout: float = 600.0  # seconds a collective may wait for a lost peer


@dataclass
class DebugCfg:
    """For tests and debugging: fault injection and a record of the sample keys each rank trained on."""

    kill_at_step: int | None = None  # rank `kill_rank` SIGKILLs itself right after this optimizer step
    kill_rank: int = 0  # the rank that kill_at_step kills
    record_keys: bool = False  # append "micro-batch index<TAB>key" lines to run.dir/keys/rank{r}.txt
    kill_in_save: bool = False  # kill_at_step's kill comes in that step's save: files written, `latest` not moved
    nan_at_steps: list[int] = field(default_factory=list)  # rank kill_rank's inputs of these steps become NaN


@dataclass
class PretrainConfig:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    zero: ZeroCfg = field(default_factory=ZeroCfg)
    precision: Literal["bf16", "fp16", "fp32", ""] = ""  # bf16, fp16 (dynamic loss scaling) or fp32
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    deepspeed: DeepSpeedCfg = field(default_factory=DeepSpeedCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    debug: DebugCfg = field(default_factory=DebugCfg)


def validate(cfg: PretrainConfig) -> PretrainConfig:
    """Check the required keys and value ranges; raise ConfigError naming each problem and its fix."""
    problems = []
    required = {
        "data.path": cfg.data.path, "run.dir": cfg.run.dir, "train.global_batch": cfg.train.global_batch,
        "train.micro_batch": cfg.train.micro_batch, "model.variant": cfg.model.variant,
        "model.image_size": cfg.model.image_size, "precision": cfg.precision,
    }
    problems += [f"{k} is required (set it in the recipe or as {k}=...)" for k, v in required.items() if not v]
    if cfg.zero.stage not in (0, 1, 2, 3):
        problems.append(f"zero.stage must be 0, 1, 2 or 3, got {cfg.zero.stage}")
    durations = [k for k in ("steps", "epochs", "samples") if getattr(cfg.train, k) is not None]
    if len(durations) != 1:
        problems.append(f"give exactly one of train.steps, train.epochs, train.samples (got {durations or 'none'})")
    for key, value in (("optim.lr", cfg.optim.lr), ("optim.weight_decay", cfg.optim.weight_decay),
                       ("optim.warmup_steps", cfg.optim.warmup_steps), ("optim.clip", cfg.optim.clip)):
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    if not 0 <= cfg.train.label_smoothing < 1:
        problems.append(f"train.label_smoothing must be in [0, 1), got {cfg.train.label_smoothing}")
    if cfg.train.ema_decay and cfg.zero.stage == 3:
        problems.append("train.ema_decay needs full parameters on every rank: use zero.stage <= 2 or ema_decay=0")
    if cfg.zero.offload_params and cfg.zero.stage != 3:
        problems.append("zero.offload_params needs zero.stage=3")
    if problems:
        raise ConfigError("bad pre-training config:\n  " + "\n  ".join(problems))
    return cfg


def load_pretrain_config(recipe: str, overrides: list[str] = ()) -> PretrainConfig:
    """Read a recipe (name in pretrain/recipes or a YAML path), apply overrides, validate."""
    return validate(load_config(PretrainConfig, recipe, list(overrides), recipes_dir=RECIPES_DIR))
