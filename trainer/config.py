"""The config sections both stages share, defined once; each stage extends `TrainerConfig` with its own.

A stage's config is a dataclass that inherits these sections and adds its model, backend and loading
sections (`pretrain/config.py`, `finetune/config.py`). `validate_common` checks what every stage needs;
`total_steps` is the one run-length rule. See docs/architecture.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.stream_config import DataCfg, data_problems, url_source_problems
from runtime.config import ConfigError

__all__ = ["DataCfg", "RunCfg", "OptimCfg", "TrainCfg", "EvalCfg", "FewShotCfg", "LogCfg", "CheckpointCfg", "DistCfg",
           "DebugCfg", "ModelCfg", "TrainerConfig", "validate_common", "validate_fewshot", "fewshot_dataset_problems",
           "is_local", "check_split", "total_steps"]


@dataclass
class RunCfg:
    dir: str = ""  # run dir: config.yaml, checkpoints/, tb/, log.txt, report.json, weight files
    seed: int = 0  # seeds the initial weights, the data order and the augmentations (mixup included)
    resume: bool = True  # continue from run.dir/checkpoints/latest when it exists (false: a run dir without one)


@dataclass
class ModelCfg:
    variant: str = ""  # B/16, L/16, H/14, ..., debug
    image_size: int | tuple[int, int] = 0  # training resolution in pixels; (h, w) allowed
    dropout: float = 0.0  # dropout after attention/MLP projections and on the embeddings
    drop_path: float = 0.0  # stochastic-depth rate of the last block (linear from 0 over depth)
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)
    compile: bool = False  # torch.compile the model after the backend wrapped it (GPU)


@dataclass
class OptimCfg:
    name: Literal["adamw", "sgd"] = "adamw"  # AdamW (pre-training, MAE-style fine-tuning) or SGD with momentum
    lr: float = 1e-3  # peak learning rate, reached after warm-up
    min_lr: float = 0.0  # learning rate at the end of the decay
    weight_decay: float = 0.03  # decoupled weight decay; not applied to biases, norms, pos-embed, cls token
    betas: tuple[float, float] = (0.9, 0.999)  # adamw betas
    eps: float = 1e-8  # adamw epsilon
    momentum: float = 0.9  # sgd momentum
    layer_decay: float = 1.0  # layer-wise LR decay: layer l of L trains at lr * decay^(L + 1 - l); 1 = off
    clip: float = 1.0  # global gradient-norm clip (0 = off)
    warmup_steps: int = 10_000  # linear warm-up from ~0 to lr, in applied optimizer steps
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
    ema_decay: float = 0.0  # EMA (Polyak) of the weights, evaluated and exported when on; 0 = off
    max_bad_steps: int = 10  # stop after this many consecutive non-finite (skipped) steps


@dataclass
class FewShotCfg:
    datasets: list[str] = field(default_factory=list)  # downstream dataset.json paths (or folders); empty = off
    shots: list[int] = field(default_factory=lambda: [1, 5, 10, 25])  # training images per class of each fit
    every: int = 0  # optimizer steps between few-shot evals; 0 = with every eval (always at the end too)
    seeds: int = 3  # per-class samples drawn (seeds 0..n-1); the reported top-1 is their mean
    holdout: int = 2  # further train images per class, held out of each sample to choose the ridge's l2
    l2: list[float] = field(default_factory=lambda: [2.0**k for k in range(-4, 21, 2)])  # ridge l2 tried (whitened)
    train_split: str = "train"  # the split the per-class samples are drawn from
    val_split: str = "val"  # the split top-1 is measured on (all of it)


@dataclass
class EvalCfg:
    every: int = 0  # optimizer steps between evaluations; 0 = at every epoch end (always at the end too)
    micro_batch: int | None = None  # None: train.micro_batch
    inspect: bool = True  # log the inspect figures (filters, pos-embed, attention) to TensorBoard at each eval
    fewshot: FewShotCfg = field(default_factory=FewShotCfg)  # few-shot linear eval (big_vision's fewshot_lsr)


@dataclass
class LogCfg:
    every: int = 50  # optimizer steps between reading the loss on the host
    peak_tflops: float | None = None  # per device, for MFU; None: from the device name
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = field(
        default_factory=lambda: ["tensorboard"], metadata={"help": (
            "where rank 0 sends the scalars, the config and the images: tensorboard (RUN_DIR/tb), wandb (WANDB_MODE "
            "decides online or offline; files in RUN_DIR/wandb), mlflow (MLFLOW_TRACKING_URI, else a file store in "
            "RUN_DIR/mlruns); wandb and mlflow are pip extras: `pip install -e .[wandb]`")})
    project: str = "vitscale"  # the wandb project and the MLflow experiment; a run is named after its run dir
    progress_every_s: float = 10.0  # eval/few-shot progress lines at ~10 % marks, at most one per this many seconds


@dataclass
class CheckpointCfg:
    every: int = 0  # optimizer steps between checkpoints; 0 = at every epoch end (always at the end too)
    keep: int = 2  # newest checkpoints kept
    signal_check_every: int = 10  # steps between the ranks agreeing on a SIGTERM/SIGUSR1/SIGINT (preemption, Ctrl-C)


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
class TrainerConfig:
    """The sections every stage has; a stage subclasses it and adds `model`, `precision` and its backend's."""

    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    log: LogCfg = field(default_factory=LogCfg)
    checkpoint: CheckpointCfg = field(default_factory=CheckpointCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    debug: DebugCfg = field(default_factory=DebugCfg)


def validate_common(cfg: TrainerConfig) -> list[str]:
    """The problems (one line each, with the fix) in the sections every stage shares."""
    problems = [f"{k} is required (set it in the recipe or as {k}=...)" for k, v in {
        "data.path": cfg.data.path, "run.dir": cfg.run.dir, "train.global_batch": cfg.train.global_batch,
        "train.micro_batch": cfg.train.micro_batch}.items() if not v]
    problems += url_source_problems(cfg.data) + data_problems(cfg.data)
    durations = [k for k in ("steps", "epochs", "samples") if getattr(cfg.train, k) is not None]
    if len(durations) != 1:
        problems.append(f"give exactly one of train.steps, train.epochs, train.samples (got {durations or 'none'})")
    problems += [f"train.{k} must be > 0, got {getattr(cfg.train, k)}" for k in durations if getattr(cfg.train, k) <= 0]
    for key, value in (("optim.lr", cfg.optim.lr), ("optim.weight_decay", cfg.optim.weight_decay),
                       ("optim.warmup_steps", cfg.optim.warmup_steps), ("optim.clip", cfg.optim.clip),
                       ("train.mixup", cfg.train.mixup), ("train.cutmix", cfg.train.cutmix),
                       ("checkpoint.every", cfg.checkpoint.every), ("eval.every", cfg.eval.every),
                       ("log.progress_every_s", cfg.log.progress_every_s)):
        if value < 0:
            problems.append(f"{key} must be >= 0, got {value}")
    problems += _fraction_problems(cfg)
    if not 0 <= cfg.train.label_smoothing < 1:
        problems.append(f"train.label_smoothing must be in [0, 1), got {cfg.train.label_smoothing}")
    if not 0 <= cfg.train.ema_decay < 1:
        problems.append(f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}")
    if cfg.train.max_bad_steps < 1:
        problems.append(f"train.max_bad_steps must be >= 1, got {cfg.train.max_bad_steps}")
    problems += validate_fewshot(cfg.eval.fewshot)
    for key, value in (("log.every", cfg.log.every), ("checkpoint.keep", cfg.checkpoint.keep),
                       ("checkpoint.signal_check_every", cfg.checkpoint.signal_check_every),  # 0: never acted on
                       ("eval.micro_batch", 1 if cfg.eval.micro_batch is None else cfg.eval.micro_batch)):
        if value < 1:
            problems.append(f"{key} must be >= 1, got {value}")
    if cfg.dist.timeout <= 0:
        problems.append(f"dist.timeout must be > 0 seconds, got {cfg.dist.timeout}")
    return problems


def _fraction_problems(cfg: TrainerConfig) -> list[str]:
    """Rates and coefficients outside their range: a torch error in every rank after the run dir was made (betas,
    SGD momentum, a negative seed under mixup), or a run that trains as not meant (momentum 1.5 diverges, a
    min_lr above lr makes the decay a rise)."""
    o = cfg.optim
    problems = [f"{key} must be in [0, 1), got {value}" for key, value in (
        ("optim.betas[0]", o.betas[0]), ("optim.betas[1]", o.betas[1]), ("optim.momentum", o.momentum))
        if not 0 <= value < 1]
    if not 0 < o.layer_decay <= 1:
        problems.append(f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
    if o.lr >= 0 and not 0 <= o.min_lr <= o.lr:  # a negative lr is named on its own
        problems.append(f"optim.min_lr must be in [0, optim.lr={o.lr}] (the rate the decay ends at), got {o.min_lr}")
    if o.eps < 0:
        problems.append(f"optim.eps must be >= 0, got {o.eps}")
    if cfg.run.seed < 0:
        problems.append(f"run.seed must be >= 0, got {cfg.run.seed}")
    if (cfg.log.peak_tflops or 0) < 0:
        problems.append(f"log.peak_tflops must be >= 0 (0 or null: from the device name), got {cfg.log.peak_tflops}")
    return problems


def model_problems(m: ModelCfg) -> list[str]:
    """The shared model keys out of range (each stage's validate adds them): a dropout or drop-path rate of 1 or
    more is torch's error in every rank after the run dir was made."""
    return [f"model.{key} must be in [0, 1), got {value}" for key, value in (
        ("dropout", m.dropout), ("drop_path", m.drop_path)) if not 0 <= value < 1]


def validate_fewshot(f: FewShotCfg, prefix: str = "eval.fewshot.") -> list[str]:
    """The problems of a few-shot section (also the `fewshot` verb's options)."""
    problems = [f"{prefix}{k} must be >= {lo}, got {v}" for k, v, lo in (
        ("every", f.every, 0), ("seeds", f.seeds, 1), ("holdout", f.holdout, 0)) if v < lo]
    if not f.shots or min(f.shots) < 1:
        problems.append(f"{prefix}shots must be a list of counts >= 1, e.g. [1,5,10,25], got {f.shots}")
    if not f.l2 or min(f.l2) <= 0:
        problems.append(f"{prefix}l2 must be a list of regularisers > 0, got {f.l2}")
    return problems


def is_local(path: str) -> bool:
    """Whether data.path names this filesystem (a dataset.json, its folder or tar paths), not a URL, `pipe:`
    command or brace pattern (checked where they are read)."""
    return "://" not in path and not path.startswith("pipe:") and "{" not in path


def fewshot_dataset_problems(f: FewShotCfg, key: str = "eval.fewshot.datasets", prefix: str = "eval.fewshot."
                             ) -> list[str]:
    """What is wrong with the few-shot datasets on this machine (checked at preflight, not in the config: a recipe
    names paths of the machine it runs on): not a dataset.json, or a class with fewer train images than the most
    shots asked (a 1000-shot fit of a class of 139 would be reported as 1000-shot). Their splits and shards are
    the loaders' checks (check_split, resolve_source)."""
    from data_prep.manifest import ManifestError, read_manifest

    problems = []
    for path in f.datasets:
        p = Path(path)
        manifest = p / "dataset.json" if p.is_dir() else p
        if not manifest.is_file():
            problems.append(f"{key}: {path} is not a dataset.json (or its folder); write one with "
                            "`python -m data_prep write SRC OUT`")
            continue
        try:
            m = read_manifest(manifest)
        except ManifestError as err:
            problems.append(f"{key}: {err}")
            continue
        per_class = m.get("label_counts", {}).get(f.train_split, [])  # none: a manifest that does not count them
        counts = [(n, c) for n, c in zip(per_class, m["classes"], strict=False) if n]
        if counts and max(f.shots) > min(counts)[0]:
            n, name = min(counts)
            problems.append(f"{prefix}shots {max(f.shots)}: class {name!r} of {path} has {n} {f.train_split} "
                            f"images; ask for at most {n} shots")
    return problems


def check_split(data: DataCfg, split: str, *, train: bool, micro_batch: int, world: int,
                global_batch: int | None = None, key: str = "", nullable: bool = False):
    """What the loaders will check of `split` (data_prep.stream.plan_loader: the dataset's format, the split and
    its shards; a global batch per epoch and a shard per loader worker when training), as a one-line ConfigError
    before anything starts; a split the dataset lacks names `key`, the option that asked for it (`nullable`: an
    eval split the run can do without). Returns plan_loader's LoaderPlan (the source, its classes)."""
    from data_prep.stream import plan_loader  # torch: only once a verb runs
    from data_prep.stream_source import MissingSplit

    try:
        return plan_loader(data, split, train=train, micro_batch=micro_batch, world=world, global_batch=global_batch)
    except MissingSplit as err:
        raise ConfigError(missing_split(err, key, nullable)) from err
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err


def total_steps(train: TrainCfg, steps_per_epoch: int) -> int:
    """The run's length in optimizer steps (the one rule both stages use): train.steps as given, else the
    epochs or samples rounded up to whole steps, so that a run never stops short of what was asked."""
    if train.steps is not None:
        return train.steps
    if train.epochs is not None:
        return math.ceil(train.epochs * steps_per_epoch)
    return math.ceil(train.samples / train.global_batch)


def missing_split(err: Exception, key: str, nullable: bool = False) -> str:
    """A missing split's message with the fix: the option that asked for it (`key`), to be set to a split the
    dataset has (or, `nullable`, to null: no evaluation)."""
    if not key:
        return str(err)
    return f"{err}: set {key} to one of them" + (" or null (no evaluation)" if nullable else "")
