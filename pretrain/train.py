"""`python -m pretrain train`: the step loop around a DeepSpeed engine.

Per step: uint8 micro-batches from the stream are normalised on the device, (mixup), forward,
fp32 loss, backward, DeepSpeed step (clip, skip on non-finite gradients). The loss stays on the
device and is read every `log.every` steps, so the host never waits on the device in between.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import signal
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as torch_dist

from data_prep.stream import build_loader, mixup_cutmix, normalize
from data_prep.stream_source import resolve_source
from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig
from pretrain.engine import build_engine
from pretrain.monitor import Monitor
from pretrain.steps import micro_step
from runtime.config import ConfigError, config_hash, save_config, to_dict
from runtime.dist import DistEnv, accumulation_steps, detect, init_distributed, shutdown
from runtime.io import atomic_write_json
from runtime.logs import get_logger, setup_logging
from runtime.training import EMA, evaluate
from vit import VisionTransformer, ViTConfig, vit_config

# Exit codes after a signal-triggered checkpoint. SIGTERM (preemption, scancel, `scontrol requeue`): 143 =
# 128 + SIGTERM, what SLURM and shells expect of a terminated job. SIGUSR1 (SLURM's warning before the time
# limit, `--signal=B:USR1@T`; `launch` then requeues the job): 0, a planned stop.
EXIT_AFTER_SIGNAL = {signal.SIGTERM: 143, signal.SIGUSR1: 0}
# The launcher that started this process (torchrun's agent), read at import, before it could have died.
LAUNCHER_PID = os.getppid()


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient."""


def class_names(cfg: PretrainConfig) -> list[str]:
    """Class names from the dataset.json, or numbered names when training from raw tar URLs."""
    path = Path(cfg.data.path)
    if path.suffix == ".json" and path.exists():
        return list(json.loads(path.read_text())["classes"])
    if cfg.model.num_classes is None:
        raise ValueError(f"{cfg.data.path} is not a dataset.json: set model.num_classes")
    return [str(i) for i in range(cfg.model.num_classes)]


def model_config(cfg: PretrainConfig, num_classes: int) -> ViTConfig:
    m = cfg.model
    return vit_config(m.variant, image_size=m.image_size, num_classes=m.num_classes or num_classes,
                      representation_size=m.representation_size, dropout=m.dropout, drop_path=m.drop_path)


def total_steps(cfg: PretrainConfig, steps_per_epoch: int) -> int:
    """The run's length in optimizer steps, from train.steps, train.epochs or train.samples."""
    t = cfg.train
    if t.steps is not None:
        return t.steps
    if t.epochs is not None:
        return math.ceil(t.epochs * steps_per_epoch)
    return math.ceil(t.samples / t.global_batch)


class _Preemption:
    """SIGTERM / SIGUSR1 set a flag; ranks agree on it at a step boundary, then checkpoint and exit.

    A lost launcher counts as SIGTERM: when torchrun's agent is killed (kill -9, OOM killer) its workers are
    re-parented and would go on training unsupervised, writing the run dir beside the rerun that replaces
    them. `launcher_pid` (our parent under torchrun) is checked at every agreement, so they stop too.
    """

    def __init__(self, launcher_pid: int | None = None):
        self.flag = False
        self.signum = signal.SIGTERM
        self.launcher_pid = launcher_pid
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag, self.signum = True, signal.Signals(signum)

    def launcher_lost(self) -> bool:
        return self.launcher_pid is not None and os.getppid() != self.launcher_pid

    def agreed(self, device: torch.device) -> bool:
        if not self.flag and self.launcher_lost():
            get_logger().warning(f"the launcher (pid {self.launcher_pid}) is gone: stopping as on SIGTERM")
            self.flag, self.signum = True, signal.SIGTERM
        if not torch_dist.is_initialized():
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())


def _loaders(cfg: PretrainConfig, env: DistEnv):
    d, t = cfg.data, cfg.train
    common = dict(dist_env=env, image_size=cfg.model.image_size, seed=cfg.run.seed)
    train = build_loader(d, d.train_split, train=True, micro_batch=t.micro_batch, global_batch=t.global_batch,
                         with_keys=True, **common)
    val = None
    if d.val_split:
        val = build_loader(d, d.val_split, train=False, micro_batch=cfg.eval.micro_batch or t.micro_batch, **common)
    return train, val


def preflight(cfg: PretrainConfig, env: DistEnv) -> None:
    """Checks that must fail on every rank alike, before any collective could wait on a failed peer
    (and before anything is written): batch arithmetic, model, dataset, and the checkpoint to resume."""
    local = "://" not in cfg.data.path and not cfg.data.path.startswith("pipe:") and "{" not in cfg.data.path
    if local and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"data.path {cfg.data.path} does not exist; write shards with "
                                "`python -m data_prep write SRC OUT` and pass OUT/dataset.json")
    try:
        accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, env.world_size)
        vit_config(cfg.model.variant, image_size=cfg.model.image_size)  # unknown variant, size vs patch size
        if local:
            resolve_source(cfg.data.path, cfg.data.train_split)  # format version, split, shards present
    except ValueError as err:
        raise ConfigError(str(err)) from err
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    if tag := ckpt.latest_tag(ckpt_dir):  # DeepSpeed would unpickle it: refuse an unsafe one now
        ckpt.check_pickles(ckpt_dir / tag)


def train(cfg: PretrainConfig) -> dict:
    """Run (or resume) pre-training as configured; returns the final metrics."""
    env = detect()
    preflight(cfg, env)
    env = init_distributed(env, timeout_s=cfg.dist.timeout, single=True)
    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=cfg.dist.timeout))
    run_dir = Path(cfg.run.dir)
    log = setup_logging(env, run_dir)
    names = class_names(cfg)
    vcfg = model_config(cfg, len(names))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    model = VisionTransformer(vcfg)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    loader, val_loader = _loaders(cfg, env)
    steps = total_steps(cfg, loader.steps_per_epoch)

    ckpt_dir = run_dir / "checkpoints"
    tag = ckpt.latest_tag(ckpt_dir)
    saved = ckpt.read_state(ckpt_dir, tag) if tag else None
    universal = bool(saved and saved["world_size"] != env.world_size)
    engine = build_engine(model, cfg, env, steps, universal=universal)
    ema = EMA(engine.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
    if tag:
        _resume(engine, loader, ema, ckpt_dir, tag, saved, env, cfg, log, universal)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
    log.info(f"ViT {cfg.model.variant} @ {vcfg.image_hw}, {len(names)} classes; {steps} steps of "
             f"{cfg.train.global_batch} on {env.world_size} ranks, ZeRO-{cfg.zero.stage} {cfg.precision}")
    monitor = Monitor(cfg, env, vcfg, run_dir, steps)
    try:
        result = _Loop(engine, loader, val_loader, ema, cfg, env, steps, names, monitor, log).run()
    finally:
        # Stop the loader workers here, on every way out. They ignore SIGTERM (preemption is the trainer's to
        # handle), so after an error (a peer lost, a collective timed out) multiprocessing's exit handler could
        # not stop them and this rank would hang at exit instead of failing.
        for stream in (loader, val_loader):
            if stream is not None:
                stream.close()
    monitor.close(result)
    result["rank_digests"] = _rank_digests(engine, cfg)
    if env.is_main:
        atomic_write_json(run_dir / "report.json", result)
    # Tear the groups down now: left to interpreter exit, gloo's threads can be destroyed still joinable
    # ("terminate called without an active exception", SIGABRT after a finished run; seen once in CI).
    shutdown()
    return result


def _resume(engine, loader, ema, ckpt_dir, tag, saved, env, cfg, log, universal) -> None:
    if saved.get("config_hash") != config_hash(cfg):
        log.warning(f"resuming {tag} with a changed config (hash {saved.get('config_hash')} -> {config_hash(cfg)})")
    load_tag = ckpt.to_universal(ckpt_dir, tag, env) if universal else tag
    ckpt.load(engine, ckpt_dir, load_tag, env, universal=universal)
    if universal:
        loader.load_state_dict(saved["stream"], strict=False)
        log.warning(f"world size changed {saved['world_size']} -> {env.world_size}: resumed {tag} via a universal "
                    "checkpoint; the data order continues at the nearest position (not sample-exact)")
    else:
        loader.load_state_dict(saved["stream"])
    if ema is not None and (shadow := ckpt.load_ema(ckpt_dir, tag)) is not None:
        ema.load_state_dict(shadow, updates=saved["step"])  # one EMA update per optimizer step
    log.info(f"resumed from {tag} (step {saved['step']})")


def _rank_digests(engine, cfg: PretrainConfig) -> list[str] | None:
    """Every rank's hash of its full model weights (equal when the ranks are in sync); None for ZeRO-3,
    where no rank holds the full weights."""
    if cfg.zero.stage == 3:
        return None
    h = hashlib.sha256()
    for name, p in sorted(engine.module.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    digests = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(digests, h.hexdigest()[:16])
    return digests


class _Loop:
    """The step loop's state: engine, loaders, EMA, counters."""

    def __init__(self, engine, loader, val_loader, ema, cfg, env, steps, names, monitor, log):
        self.engine, self.loader, self.val_loader, self.ema = engine, loader, val_loader, ema
        self.cfg, self.env, self.steps, self.names, self.monitor, self.log = cfg, env, steps, names, monitor, log
        self.device, self.dtype = engine.device, next(engine.module.parameters()).dtype
        self.preempt = _Preemption(LAUNCHER_PID if env.launcher in ("torchrun", "deepspeed") else None)
        self.bad = 0
        self.metrics: dict = {}
        self.keys: list[str] = []
        self.micro = engine.global_steps * engine.gradient_accumulation_steps()
        self.keys_file = None
        if cfg.debug.record_keys:
            keys_dir = Path(cfg.run.dir) / "keys"
            keys_dir.mkdir(parents=True, exist_ok=True)
            self.keys_file = open(keys_dir / f"rank{env.rank}.txt", "a", buffering=1)  # noqa: SIM115

    def prepare(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch -> normalised model-dtype inputs and labels on the device."""
        return normalize(images, dtype=self.dtype, device=self.device), labels.to(self.device, non_blocking=True)

    def run(self) -> dict:
        engine, t, meter = self.engine, self.cfg.train, self.monitor.meter
        step = engine.global_steps
        while step < self.steps:
            meter.start_wait()
            for images, labels, keys in self.loader:
                meter.end_wait()
                self.monitor.first_batch(images, step)
                self.keys += keys
                if self.keys_file is not None:  # "micro-batch index <tab> key"; a resumed run rewrites its indices
                    self.keys_file.write("".join(f"{self.micro}\t{k}\n" for k in keys))
                x, y = self.prepare(images, labels)
                if engine.global_steps + 1 in self.cfg.debug.nan_at_steps and self.env.rank == self.cfg.debug.kill_rank:
                    x = x.fill_(float("nan"))  # fault injection: a batch that makes the loss and gradients NaN
                if t.mixup or t.cutmix:
                    # seeded per rank and micro-batch, so a resumed run draws the same mixes
                    rng = np.random.default_rng((self.cfg.run.seed, self.env.rank, self.micro))
                    x, y = mixup_cutmix(x, y, len(self.names), mixup_alpha=t.mixup, cutmix_alpha=t.cutmix,
                                        label_smoothing=t.label_smoothing, rng=rng)
                self.micro += 1
                boundary = engine.is_gradient_accumulation_boundary()
                self.monitor.add_loss(micro_step(engine, x, y, t.loss, t.label_smoothing))
                if boundary:
                    step = engine.global_steps
                    meter.end_step(t.global_batch)
                    self.after_step(step)
                    self.keys = []
                    if step >= self.steps:
                        break
                meter.start_wait()
        if self.keys_file is not None:
            self.keys_file.close()
        evals = {f"eval/{k}": v for k, v in self.metrics.items()}
        return {"step": step, "skipped_steps": engine.skipped_steps, **evals}

    def after_step(self, step: int) -> None:
        """Everything done at an optimizer-step boundary: checks, EMA, logs, eval, checkpoints, preemption."""
        cfg, last = self.cfg, step == self.steps
        if self._kill_now(step, in_save=False):
            os.kill(os.getpid(), signal.SIGKILL)
        self.bad = 0 if self.engine.was_step_applied() else self.bad + 1
        if self.bad >= cfg.train.max_bad_steps:
            raise NonFiniteLoss(f"{self.bad} consecutive steps up to step {step} had a non-finite loss or gradient "
                                f"(its batch on rank {self.env.rank}: {', '.join(self.keys[:8])} ...); "
                                "lower optim.lr, raise optim.warmup_steps, or check the data")
        if self.bad:
            self.log.warning(f"step {step} skipped: non-finite loss or gradient ({self.bad} in a row, the limit is "
                             f"train.max_bad_steps={cfg.train.max_bad_steps}); its batch on rank {self.env.rank}: "
                             f"{', '.join(self.keys[:8])} ...")
        if self.ema is not None:
            self.ema.update(self.engine.module)
        if step % cfg.log.every == 0 or last:
            self.monitor.log_train(self.engine, step, self.loader.stats)
        if self.val_loader is not None and (_every(step, cfg.eval.every) or last):
            self.metrics = evaluate(self.engine, self.val_loader, self.prepare)
            self.monitor.log_eval(self.metrics, step)
        saved = _every(step, cfg.checkpoint.every) or last
        if saved:
            self.save(step)
        if _every(step, cfg.checkpoint.signal_check_every) and self.preempt.agreed(self.device):
            if not saved:
                self.save(step)
            self.log.warning(f"preempted ({self.preempt.signum.name}): checkpoint saved at step {step}; rerun the "
                             "same command to resume")
            raise SystemExit(EXIT_AFTER_SIGNAL[self.preempt.signum])

    def save(self, step: int) -> None:
        state = {"stream": self.loader.state_dict(), "config_hash": config_hash(self.cfg),
                 "class_names": self.names, "model": to_dict(self.cfg.model)}
        shadow = {k: v.cpu() for k, v in self.ema.shadow.items()} if self.ema is not None else None
        fault = (lambda: os.kill(os.getpid(), signal.SIGKILL)) if self._kill_now(step, in_save=True) else None
        ckpt.save(self.engine, Path(self.cfg.run.dir) / "checkpoints", step, state, self.env,
                  self.cfg.checkpoint.keep, ema=shadow, fault=fault)

    def _kill_now(self, step: int, in_save: bool) -> bool:
        """Fault injection (debug.kill_*): is this rank to SIGKILL itself at this step (in its save)?"""
        d = self.cfg.debug
        return d.kill_at_step == step and d.kill_rank == self.env.rank and d.kill_in_save == in_save


def _every(step: int, n: int) -> bool:
    return bool(n) and step % n == 0
