"""The one step loop both stages run (see docs/architecture.md).

Per micro-batch: uint8 images from the stream are normalised on the device, (seeded mixup/cutmix), forward,
fp32 loss, backward; at the accumulation boundary the backend clips and steps, or skips the step when the
gradient is not finite. The LR is set before every step from the number of APPLIED steps, so a skipped step
does not advance the schedule, and the run lasts `total` applied steps (a skipped step is made up with the
next batch), so the schedule always ends where it was set to. After each step: EMA, log, eval, checkpoint
and preemption, when due. The loss stays on the device and is read every `log.every` steps, so the host never
waits in between.
"""

from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from data_prep.stream import mixup_cutmix, normalize
from runtime.config import config_hash, to_dict
from runtime.dist import DistEnv, all_gather_objects
from runtime.logs import get_logger
from runtime.progress import LogProgress
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.errors import NonFiniteLoss
from trainer.evaluate import evaluate
from trainer.fewshot import FewShotEval
from trainer.loss import classification_loss
from trainer.monitor import Monitor
from trainer.optim import EMA, lr_at
from trainer.preempt import LAUNCHER_PID, Preemption
from vit import ViTConfig
from vit.weights import EvalSettings, save_weights


class Inputs(NamedTuple):
    """How a run feeds its model: the resize filter of its crops and evals, and `(pixel / 255 - mean) / std`
    (trainer/run.py's `inputs`: from the config, else what the init or the resumed checkpoint was fed with)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str


@dataclass
class RunState:
    """Everything of the loop a checkpoint restores (besides backend, RNG, EMA and stream files)."""

    step: int = 0  # optimizer steps taken (applied or skipped): the data position
    applied: int = 0  # optimizer steps applied: the LR schedule's clock
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    evals: list = field(default_factory=list)
    best_top1: float = -1.0
    fewshot: list = field(default_factory=list)  # {"step", dataset: {shots: top-1}} per few-shot eval


class Loop:
    """One run's step loop over a backend, a train stream and an optional eval stream."""

    def __init__(self, cfg: TrainerConfig, env: DistEnv, backend, loader, val_loader, vcfg: ViTConfig,
                 names: list[str], total: int, run_dir: Path, inputs: Inputs):
        self.cfg, self.env, self.backend, self.loader, self.val_loader = cfg, env, backend, loader, val_loader
        self.vcfg, self.names, self.total, self.run_dir = vcfg, names, total, run_dir
        self.log = get_logger()
        self.state = RunState()
        self.ema = EMA(backend.module, cfg.train.ema_decay) if cfg.train.ema_decay else None
        self.monitor = Monitor(cfg, env, vcfg, run_dir, total)
        self.fewshot = FewShotEval(cfg, env, vcfg.image_hw, self.monitor, inputs.interpolation) \
            if cfg.eval.fewshot.datasets else None
        launched = env.launcher in ("torchrun", "deepspeed")
        self.preempt = Preemption(LAUNCHER_PID if launched else None)
        self.bad, self.keys, self.micro = 0, [], 0
        # how the run feeds its model (trainer/run.py's `inputs`), stored with every weight file
        self.settings = EvalSettings(image_size=vcfg.image_hw, crop_pct=cfg.data.crop_pct, mean=inputs.mean,
                                     std=inputs.std, interpolation=inputs.interpolation,
                                     precision=backend.eval_precision())
        self.norm = (self.settings.mean, self.settings.std)
        self.keys_file = None
        if cfg.debug.record_keys:
            (run_dir / "keys").mkdir(parents=True, exist_ok=True)
            self.keys_file = open(run_dir / "keys" / f"rank{env.rank}.txt", "a", buffering=1)  # noqa: SIM115

    # ---- checkpoint state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        s = self.state
        return {"step": s.step, "applied": s.applied, "skipped": s.skipped, "evals": s.evals,
                "best_top1": s.best_top1, "fewshot": s.fewshot, "epoch": self.loader.epoch,
                "stream": self.loader.state_dict(),
                "ema_updates": self.ema.updates if self.ema is not None else 0, "config_hash": config_hash(self.cfg),
                "config": to_dict(self.cfg), "class_names": self.names, "vit_config": self.vcfg.to_json(),
                "eval_settings": self.settings.to_dict(), "evaluated_ema": self.ema is not None}

    def resume(self, ckpt_dir: Path, tag: str, saved: dict, universal: bool) -> None:
        """Restore the whole state of checkpoint `tag` (the backend's files, stream, RNG, EMA, counters)."""
        breaking = self.log_changes(ckpt_dir, tag, saved)
        self.backend.load(ckpt_dir, tag, universal)
        # a change that breaks exact resume (allowed by --allow-changed) continues at the nearest position too
        self.loader.load_state_dict(saved["stream"], strict=not (universal or breaking))
        if universal:
            self.log.warning(f"world size changed {saved['world_size']} -> {self.env.world_size}: resumed {tag}; "
                             "the data order continues at the nearest position (not sample-exact)")
        else:
            ckpt.load_rng(ckpt_dir, tag, self.env.rank)
        if self.ema is not None and (shadow := ckpt.load_ema(ckpt_dir, tag)) is not None:
            self.ema.load_state_dict(shadow, updates=saved["ema_updates"])
        self.state = RunState(step=saved["step"], applied=saved["applied"], skipped=saved["skipped"],
                              evals=saved["evals"], best_top1=saved["best_top1"], fewshot=saved.get("fewshot", []))
        self.micro = self.state.step * self.backend.accumulation
        self.log.info(f"resumed from {tag} (step {saved['step']}, {saved['skipped']} skipped)")

    def log_changes(self, ckpt_dir: Path, tag: str, saved: dict) -> bool:
        """Log each config key changed since checkpoint `tag` (old -> new); True if one breaks exact resume
        (preflight refused those unless `--allow-changed`)."""
        changes = ckpt.resume_changes(ckpt_dir, saved, self.cfg)
        if changes is None:  # a checkpoint without its config: only the hash tells
            if saved.get("config_hash") != config_hash(self.cfg):
                self.log.warning(f"resuming {tag} with a changed config (hash {saved.get('config_hash')} -> "
                                 f"{config_hash(self.cfg)})")
            return False
        breaking, harmless = changes
        for line in breaking:
            self.log.warning(f"resuming {tag} with a changed {line} (--allow-changed: not sample-exact)")
        for line in harmless:
            self.log.info(f"resuming {tag} with a changed {line}")
        return bool(breaking)

    def save(self) -> None:
        step = self.state.step
        shadow = {k: v.cpu() for k, v in self.ema.shadow.items()} if self.ema is not None else None
        fault = (lambda: os.kill(os.getpid(), signal.SIGKILL)) if self._kill_now(step, in_save=True) else None
        ckpt.save(self.backend, self.run_dir / "checkpoints", step, self.state_dict(), self.env,
                  self.cfg.checkpoint.keep, ema=shadow, fault=fault)

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to the end; returns the report (also written to run.dir/report.json by rank 0)."""
        meter, s = self.monitor.meter, self.state
        if self.fewshot is not None and s.step == 0:
            self.run_fewshot()  # a fresh run's baseline at initialisation: the curve starts where the weights did
        try:
            while s.applied < self.total:  # the run is `total` applied steps: a skipped step is made up
                meter.start_wait()
                for images, labels, keys in self.loader:
                    meter.end_wait()
                    self.micro_step(images, labels, keys)
                    if self.micro % self.backend.accumulation == 0:
                        meter.end_step(self.cfg.train.global_batch)
                        self.after_step()
                        self.keys = []
                        if s.applied >= self.total:
                            break
                    meter.start_wait()
        finally:
            if self.keys_file is not None:
                self.keys_file.close()
        return self.report()

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, keys: list[str]) -> None:
        cfg, t, s = self.cfg, self.cfg.train, self.state
        self.monitor.first_batch(images, s.step)
        self.keys += keys
        if self.keys_file is not None:  # "micro-batch index <tab> key"; a resumed run rewrites its indices
            self.keys_file.write("".join(f"{self.micro}\t{k}\n" for k in keys))
        x = normalize(images, *self.norm, dtype=self.backend.input_dtype, device=self.backend.device)  # (B, 3, H, W)
        y = labels.to(self.backend.device, non_blocking=True)  # (B,)
        if s.step + 1 in cfg.debug.nan_at_steps and self.env.rank == cfg.debug.kill_rank:
            x = x.fill_(float("nan"))  # fault injection: a batch that makes the loss and gradients NaN
        if t.mixup or t.cutmix:  # seeded per rank and micro-batch, so a resumed run draws the same mixes
            rng = np.random.default_rng((cfg.run.seed, self.env.rank, self.micro))
            x, y = mixup_cutmix(x, y, len(self.names), mixup_alpha=t.mixup, cutmix_alpha=t.cutmix,
                                label_smoothing=t.label_smoothing, rng=rng)
        boundary = (self.micro + 1) % self.backend.accumulation == 0
        if boundary:
            self.backend.set_lr(lr_at(s.applied, self.total, cfg.optim))
        self.micro += 1
        loss = self.backend.micro_step(x, y, self._loss, boundary)
        self.monitor.add_loss(loss)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, targets, self.cfg.train.loss, self.cfg.train.label_smoothing)

    def after_step(self) -> None:
        """Everything done at an optimizer-step boundary: checks, EMA, logs, eval, checkpoints, preemption."""
        cfg, s = self.cfg, self.state
        lr = lr_at(s.applied, self.total, cfg.optim)
        s.step += 1
        if self._kill_now(s.step, in_save=False):
            os.kill(os.getpid(), signal.SIGKILL)
        self._count_applied()
        last, epoch_end = s.applied == self.total, self.loader.position == 0
        if self.ema is not None:
            self.ema.update(self.backend.module)
        if s.step % cfg.log.every == 0 or last:
            self.monitor.log_train(self.backend, s.step, lr, s.skipped, self.loader.stats)
        if self.val_loader is not None and (_due(s.step, cfg.eval.every, epoch_end) or last):
            self.run_eval()
        if self.fewshot is not None and (_due(s.step, cfg.eval.fewshot.every or cfg.eval.every, epoch_end) or last):
            self.run_fewshot()
        saved = _due(s.step, cfg.checkpoint.every, epoch_end) or last
        if saved:
            self.save()
        if _due(s.step, cfg.checkpoint.signal_check_every, False) and self.preempt.agreed(self.backend.device):
            if not saved:
                self.save()
            self.log.warning(f"preempted ({self.preempt.signum.name}): checkpoint saved at step {s.step}; rerun the "
                             "same command to resume")
            raise SystemExit(self.preempt.exit_code)

    def _count_applied(self) -> None:
        s, limit = self.state, self.cfg.train.max_bad_steps
        if self.backend.step_applied():
            s.applied, self.bad = s.applied + 1, 0
            return
        s.skipped, self.bad = s.skipped + 1, self.bad + 1
        batch = f"its batch on rank {self.env.rank}: {', '.join(self.keys[:8])} ..."
        if self.bad >= limit:
            raise NonFiniteLoss(f"{self.bad} consecutive steps up to step {s.step} had a non-finite loss or gradient "
                                f"({batch}); lower optim.lr, raise optim.warmup_steps, or check the data")
        self.log.warning(f"step {s.step} skipped: non-finite loss or gradient ({self.bad} in a row, the limit is "
                         f"train.max_bad_steps={limit}); {batch}")

    # ---- eval and weights ---------------------------------------------------------------------------------
    def _evaluate(self, desc: str = "eval") -> dict:
        b = self.backend
        progress = LogProgress(len(self.val_loader), desc, ranks=self.env.world_size,
                               min_interval=self.cfg.log.progress_every_s) if self.env.is_main else None
        return evaluate(b.eval_model(), self.val_loader, b.device, b.input_dtype, b.eval_context, self.norm, progress)

    def run_eval(self) -> None:
        """Evaluate the kept weights (the EMA when enabled, the raw weights' top-1 beside it); keep
        last.safetensors and, when top-1 improves, best.safetensors."""
        s = self.state
        m = self._evaluate()
        if self.ema is not None:
            with swapped(self.backend.module, self.ema.state_dict()):
                m = {**self._evaluate("eval (EMA)"), "raw_top1": m["top1"]}
        m.update(step=s.step, epoch=self.loader.epoch)
        s.evals.append(m)
        self.monitor.log_eval(m, s.step)
        weights = self.kept_weights()
        if weights is not None and self.env.is_main:
            save_weights(self.run_dir / "last.safetensors", weights, self.vcfg, self.names, s.step,
                         eval_settings=self.settings)
            if m["top1"] > s.best_top1:
                save_weights(self.run_dir / "best.safetensors", weights, self.vcfg, self.names, s.step,
                             eval_settings=self.settings)
        s.best_top1 = max(s.best_top1, m["top1"])
        if self.cfg.eval.inspect and weights is not None and self.monitor.sample_images is not None:
            # rank 0 only; not under ZeRO-3 (no full weights)
            self.monitor.log_inspect(weights, self.vcfg, s.step, self.norm)

    def run_fewshot(self) -> None:
        """Few-shot linear eval of the kept weights (EMA when enabled), as the top-1 eval."""
        if self.ema is not None:
            with swapped(self.backend.module, self.ema.state_dict()):
                r = self.fewshot.run(self.backend, self.state.step, self.norm)
        else:
            r = self.fewshot.run(self.backend, self.state.step, self.norm)
        self.state.fewshot.append({"step": self.state.step, **r})

    def kept_weights(self) -> dict[str, torch.Tensor] | None:
        """fp32 CPU copies of the weights evaluated and kept (EMA when enabled); None under ZeRO-3."""
        sd = self.ema.state_dict() if self.ema is not None else self.backend.full_weights()
        if sd is None:
            return None
        # the evaluated precision: a bf16 backend evaluates bf16-rounded weights, so keep those exactly
        dtype = next(self.backend.module.parameters()).dtype
        return {k: v.detach().to(dtype).float().cpu() for k, v in sd.items()}

    def report(self) -> dict:
        s = self.state
        evals = s.evals
        return {"steps": s.step, "total_steps": self.total, "applied_steps": s.applied, "skipped_steps": s.skipped,
                "epochs": self.loader.epoch, "world_size": self.env.world_size, "backend": self.backend.name,
                "image_size": list(self.vcfg.image_hw), "grid": list(self.vcfg.grid),
                "weights": "ema" if self.ema is not None else "model",
                "best": max(evals, key=lambda m: m["top1"]) if evals else None,
                "last": evals[-1] if evals else None, "evals": evals, "fewshot": s.fewshot,
                "rank_digests": self.rank_digests()}

    def rank_digests(self) -> list[str] | None:
        """Every rank's hash of its full weights (equal when the ranks are in sync); None under ZeRO-3."""
        sd = self.backend.full_weights()
        if sd is None:
            return None
        h = hashlib.sha256()
        for name, p in sorted(sd.items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
        return all_gather_objects(h.hexdigest()[:16])

    def _kill_now(self, step: int, in_save: bool) -> bool:
        """Fault injection (debug.kill_*): is this rank to SIGKILL itself at this step (in its save)?"""
        d = self.cfg.debug
        return d.kill_at_step == step and d.kill_rank == self.env.rank and d.kill_in_save == in_save


class swapped:
    """Context: `module` holds the weights `sd` inside, its own again after (EMA evaluation)."""

    def __init__(self, module: nn.Module, sd: dict[str, torch.Tensor]):
        self.module, self.sd = module, sd

    def __enter__(self) -> None:
        own = self.module.state_dict()
        self.backup = {k: v.detach().clone() for k, v in own.items()}
        self.module.load_state_dict({k: v.to(own[k].dtype) for k, v in self.sd.items()})

    def __exit__(self, *exc) -> None:
        self.module.load_state_dict(self.backup)


def _due(step: int, every: int, epoch_end: bool) -> bool:
    """Every N steps, or (N = 0) at every epoch end."""
    return step % every == 0 if every else epoch_end
