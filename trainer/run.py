"""A training run of any stage: preflight, model, process group, streams, backend, resume, loop, report.

A stage is configuration plus loading: it hands `train` its config and a `Stage` (how to build the plain
model before any process group exists, and which backend wraps it). Every check that can fail on bad input
runs first, on every rank alike, before a process group or the run dir is made (the error contract:
one line, exit 2; see trainer/cli.py and docs/architecture.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from data_prep.stream import build_loader
from data_prep.stream_config import DEFAULT_INTERPOLATION
from data_prep.stream_source import MissingSplit, resolve_source
from runtime.config import ConfigError, save_config, to_dict
from runtime.dist import DistEnv, accumulation_steps, detect, init_distributed, main_decides, shutdown
from runtime.io import atomic_write_json, unwritable
from runtime.lock import DirLock
from runtime.logs import setup_logging
from trainer import checkpoint as ckpt
from trainer.config import (
    DataCfg,
    TrainerConfig,
    check_split,
    fewshot_dataset_problems,
    is_local,
    missing_split,
    total_steps,
)
from trainer.loop import Inputs, Loop
from trainer.optim import param_groups
from trainer.trackers import missing_trackers
from vit import ViTConfig
from vit.weights import IMAGENET_MEAN, IMAGENET_STD


class Built(NamedTuple):
    """A stage's model as its `build` returns it: the plain module, its config, a line for the log, and how its
    weights were fed where they record it (fine-tuning's init: its eval settings): the input normalisation
    (mean, std) and the resize filter."""

    model: nn.Module
    vcfg: ViTConfig
    note: str
    norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    interpolation: str | None = None


@dataclass
class Stage:
    """What a stage adds to the core: its model (built on the CPU from the class names, before any process
    group: loading errors are bad input; returns a `Built`) and its backend (a callable taking (model, groups,
    cfg, env, universal), named by the checkpoints it writes)."""

    name: str
    build: Callable[[list[str]], Built]
    backend: Callable[..., object]
    backend_name: str
    report: dict = field(default_factory=dict)


def class_names(data: DataCfg) -> list[str]:
    """Class names from the dataset.json (or its folder), or numbered names from data.num_classes."""
    p = Path(data.path)
    p = p / "dataset.json" if p.is_dir() else p
    if p.suffix == ".json" and p.is_file():
        classes = json.loads(p.read_text()).get("classes") or []
        if classes and data.num_classes not in (None, len(classes)):
            raise ConfigError(f"data.num_classes={data.num_classes} but {p} has {len(classes)} classes; drop "
                              "data.num_classes")
        if classes:
            return list(classes)
    if data.num_classes is None:
        raise ConfigError(f"cannot tell the number of classes of {data.path} (not a dataset.json with classes): "
                          "set data.num_classes")
    return [str(i) for i in range(data.num_classes)]


def normalisation(data: DataCfg, init: tuple | None, where: str = "the init's eval settings"
                  ) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where they came from) of the inputs `(pixel / 255 - mean) / std`: data.mean / data.std where set,
    else `init` (what the init weights were trained with, or a resumed run's own), else ImageNet's. Fine-tuning a
    model on inputs scaled unlike its pre-training (a Hub or big_vision ViT's 0.5 against ImageNet's) starts it off
    its own features."""
    base, where = (init, where) if init else ((IMAGENET_MEAN, IMAGENET_STD), "ImageNet's")
    given = [k for k in ("mean", "std") if getattr(data, k) is not None]
    source = " and ".join(f"data.{k}" for k in given) + (f", the rest {where}" if len(given) == 1 else "")
    mean = tuple(data.mean) if data.mean is not None else tuple(base[0])
    std = tuple(data.std) if data.std is not None else tuple(base[1])
    return mean, std, source or where


RESUMED = "as the run trained so far: its checkpoint's eval settings"


def resize_filter(data: DataCfg, init: str | None, where: str = "the init's eval settings") -> tuple[str, str]:
    """(filter, where it came from) of the run's crops and evals: data.interpolation where set, else `init` (the
    init's eval filter, or a resumed run's own), else PIL's bilinear."""
    if data.interpolation is not None:
        return data.interpolation, "data.interpolation"
    return (init, where) if init else (DEFAULT_INTERPOLATION, "the default")


def inputs(data: DataCfg, saved: dict | None, built: Built) -> tuple[Inputs, str]:
    """How the run feeds its model (normalisation and resize filter, each from the config, else as the init's
    weights were fed) and a line for the log saying so. A resumed run keeps its checkpoint's (a changed or
    upgraded init must not change its inputs mid-run; one an older vitscale started keeps ImageNet's)."""
    ev = (saved or {}).get("eval_settings") or {}
    if "mean" in ev and "std" in ev:
        norm, filt, where = (ev["mean"], ev["std"]), ev.get("interpolation"), RESUMED
    else:
        norm, filt, where = built.norm, built.interpolation, "the init's eval settings"
    mean, std, norm_from = normalisation(data, norm, where)
    interpolation, filter_from = resize_filter(data, filt, where)
    said = f"inputs resized {interpolation}" + (f" ({filter_from})" if filter_from != norm_from else "")
    said += f" and normalised with mean {_fmt(mean)} std {_fmt(std)} ({norm_from})"
    return Inputs(mean, std, interpolation), said


def preflight(cfg: TrainerConfig, env: DistEnv, backend: str, allow_changed: bool = False) -> None:
    """Checks that must fail on every rank alike, before any collective could wait on a failed peer and before
    anything is written: trackers installed, batch arithmetic, what the loaders check (dataset format, splits and
    shards; a global batch per epoch, a shard per loader worker), a run dir it can write, and the checkpoint to
    resume (and the config changes since it: those that break exact resume need `allow_changed`)."""
    if missing := missing_trackers(cfg.log.trackers):
        raise ConfigError("; ".join(missing))
    d = cfg.data
    if is_local(d.path) and not Path(d.path).exists():
        raise ConfigError(f"data.path {d.path} does not exist; write shards with `python -m data_prep write SRC OUT` "
                          "and pass OUT/dataset.json")
    try:
        accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, env.world_size)
        # what the loaders will check, here on every rank before anything exists
        check_split(d, d.train_split, train=True, micro_batch=cfg.train.micro_batch,
                    global_batch=cfg.train.global_batch, world=env.world_size, key="data.train_split")
        if d.val_split:
            check_split(d, d.val_split, train=False, micro_batch=cfg.eval.micro_batch or cfg.train.micro_batch,
                        world=env.world_size, key="data.val_split", nullable=True)
        fs = cfg.eval.fewshot
        if missing := fewshot_dataset_problems(fs):
            raise ConfigError("; ".join(missing))
        for path in fs.datasets:  # their splits, before the first few-shot eval (step 0) could fail mid-run
            for key, split in (("eval.fewshot.train_split", fs.train_split), ("eval.fewshot.val_split", fs.val_split)):
                try:
                    resolve_source(path, split)
                except MissingSplit as err:
                    raise ConfigError(missing_split(err, key)) from err
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    check_run_dir(Path(cfg.run.dir))
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    if not cfg.run.resume and (tag := ckpt.latest_tag(ckpt_dir)):  # a fresh run would write over its checkpoints
        raise ConfigError(f"run.resume=false, but run.dir {cfg.run.dir} holds another run's checkpoints (latest "
                          f"{tag}), which a fresh run would overwrite and mix with its own: pass a new run.dir, or "
                          f"delete {ckpt_dir} to start over there")
    if cfg.run.resume and (tag := ckpt.latest_tag(ckpt_dir)):
        state = ckpt.check_resumable(ckpt_dir, tag, backend)
        ckpt.check_pickles(ckpt_dir / tag, ckpt.DEEPSPEED_GLOBALS)  # a backend would unpickle it: refuse one unsafe
        ckpt.check_changes(ckpt_dir, tag, state, cfg, allow_changed)


def check_run_dir(run_dir: Path) -> None:
    """A ConfigError unless `run_dir` is a folder, or can be made one, that this process may write in."""
    if why := unwritable(run_dir):
        raise ConfigError(f"run.dir {run_dir}: {why}; pass another run.dir")


def _loaders(cfg: TrainerConfig, env: DistEnv, vcfg: ViTConfig, device: torch.device, interpolation: str):
    data = replace(cfg.data, interpolation=interpolation)  # the run's filter (`inputs`)
    common = dict(dist_env=env, image_size=vcfg.image_hw, seed=cfg.run.seed, device=device)
    train = build_loader(data, cfg.data.train_split, train=True, micro_batch=cfg.train.micro_batch,
                         global_batch=cfg.train.global_batch, with_keys=True, **common)
    val = None
    if cfg.data.val_split:
        val = build_loader(data, cfg.data.val_split, train=False,
                           micro_batch=cfg.eval.micro_batch or cfg.train.micro_batch, **common)
    return train, val


def train(cfg: TrainerConfig, stage: Stage, allow_changed: bool = False) -> dict:
    """Run (or resume) a stage's training as configured; returns the report (also run.dir/report.json).
    `allow_changed`: resume even when the config changed a key exact resume depends on (trainer/checkpoint.py)."""
    env = detect()
    preflight(cfg, env, stage.backend_name, allow_changed)
    names = class_names(cfg.data)
    torch.manual_seed(cfg.run.seed)  # identical initial weights (and new heads) on every rank
    try:
        built = stage.build(names)
    except ValueError as err:  # a model the config or the init weights cannot make (contract broken, bad size)
        raise ConfigError(" ".join(str(err).split())) from err
    env = init_distributed(env, timeout_s=cfg.dist.timeout, single=True)
    lock = claim_run_dir(Path(cfg.run.dir), env)
    try:
        return _run(cfg, stage, env, built, names, lock)
    finally:
        lock.release()


def claim_run_dir(run_dir: Path, env: DistEnv) -> DirLock:
    """Rank 0 locks the run dir for this job (runtime/lock.py); if another job holds it, every rank stops with
    one line, exit 2, having written nothing, and no process group left."""
    lock = DirLock(run_dir)
    if holder := main_decides(lock.acquire, env):
        shutdown()
        raise ConfigError(f"run.dir {run_dir} is in use by another job ({holder}); wait for that job to end, or pass "
                          "another run.dir")
    return lock


def _run(cfg: TrainerConfig, stage: Stage, env: DistEnv, built: Built, names: list[str], lock: DirLock) -> dict:
    """`train` once the run dir is this job's: logging, streams, backend, resume, loop, report."""
    model, vcfg = built.model, built.vcfg
    run_dir = Path(cfg.run.dir)
    log = setup_logging(env, run_dir)
    log.info(built.note)
    if not lock.supported:
        log.warning(f"run.dir {run_dir} is on a filesystem without file locks: a second job into it is not refused")
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    ckpt_dir = run_dir / "checkpoints"
    tag = ckpt.latest_tag(ckpt_dir) if cfg.run.resume else None
    saved = ckpt.read_state(ckpt_dir, tag) if tag else None
    feed, said = inputs(cfg.data, saved, built)
    log.info(said)
    loader, val_loader = _loaders(cfg, env, vcfg, device, feed.interpolation)
    loop = None
    try:
        total = total_steps(cfg.train, loader.steps_per_epoch)
        universal = bool(saved and saved["world_size"] != env.world_size)
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.layer_decay)
        backend = stage.backend(model, groups, cfg, env, universal)
        loop = Loop(cfg, env, backend, loader, val_loader, vcfg, names, total, run_dir, feed)
        if tag:
            loop.resume(ckpt_dir, tag, saved, universal)
        if env.is_main:
            save_config(cfg, run_dir / "config.yaml")
        log.info(f"{stage.name}: ViT {vcfg.width}x{vcfg.depth} @ {vcfg.image_hw}, {len(names)} classes; {total} steps "
                 f"of {cfg.train.global_batch} ({backend.accumulation} x {cfg.train.micro_batch} x {env.world_size}), "
                 f"{loader.steps_per_epoch} steps per epoch, {backend.name} {cfg.precision}")
        report = loop.run()
        loop.monitor.close(report)
        report.update(stage=stage.name, **stage.report, config=to_dict(cfg))
        if env.is_main:
            atomic_write_json(run_dir / "report.json", report)
        backend.close()
    finally:
        if loop is not None:  # after an error or a signal: the trackers end their run as failed (a no-op after close)
            loop.monitor.close(None)
            loop.preempt.restore()
        # Stop the loader workers here, on every way out. They ignore SIGTERM (preemption is the trainer's to
        # handle), so after an error (a peer lost, a collective timed out) they must not outlive the rank.
        for stream in (loader, val_loader):
            if stream is not None:
                stream.close()
    # Tear the groups down now: left to interpreter exit, gloo's threads can be destroyed still joinable
    # ("terminate called without an active exception", SIGABRT after a finished run; seen once in CI).
    shutdown()
    return report


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
