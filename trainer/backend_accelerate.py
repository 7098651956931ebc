"""The Accelerate backend: plain data parallel (DDP, or gloo on CPU), or Accelerate's DeepSpeed plugin (ZeRO-2).

The only module that imports `accelerate`. It wraps a plain `nn.Module` and a torch optimizer, compiles after
wrapping (so DDP's gradient hooks fire per bucket during the backward and its all-reduce overlaps it), and
exposes the operations the loop needs (`trainer.backend.Backend`). Non-finite gradients skip the step here,
as DeepSpeed does, so the loop counts skipped steps alike for both stages. See docs/architecture.md.

Checkpoint files (data parallel): model.safetensors (fp32) and optimizer.pt (tensors and numbers only,
loaded with weights_only=True after `check_pickles`); every rank holds the same, so rank 0 writes and any
world size can load them. Under the DeepSpeed plugin the engine writes its own shards (same world size).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.config import ConfigError
from runtime.dist import DistEnv, accumulation_steps, barrier
from runtime.io import atomic_path
from trainer.checkpoint import check_pickles
from trainer.optim import build_optimizer, set_lr

MODEL_FILE, OPTIM_FILE = "model.safetensors", "optimizer.pt"


def make_accelerator(cfg, env: DistEnv):
    """An Accelerator for the config: plain data parallel, or Accelerate's DeepSpeed plugin with ZeRO-2."""
    from accelerate import Accelerator, DeepSpeedPlugin

    accum = accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, env.world_size)
    plugin = None
    if cfg.deepspeed.zero_stage:
        plugin = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch, "gradient_accumulation_steps": accum,
            "train_batch_size": cfg.train.global_batch, "gradient_clipping": cfg.optim.clip,
            "zero_optimization": {
                "stage": cfg.deepspeed.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu" if cfg.deepspeed.offload_optimizer else "none"}},
            "bf16": {"enabled": cfg.precision == "bf16"}, "fp16": {"enabled": cfg.precision == "fp16"},
            # accumulate micro-batch gradients in fp32, as the pre-training backend does
            "data_types": {"grad_accum_dtype": "fp32"}})
    try:
        # cpu=True on a CPU-only machine: without it Accelerate starts no process group under torchrun there
        # and every rank would train alone (DistributedType.NO), silently.
        acc = Accelerator(mixed_precision={"fp32": "no"}.get(cfg.precision, cfg.precision),
                          gradient_accumulation_steps=accum, deepspeed_plugin=plugin,
                          step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available())
    except Exception as e:  # importlib.metadata.PackageNotFoundError: transformers
        if plugin is not None and "transformers" in str(e):
            raise ConfigError("deepspeed.zero_stage=2 uses Accelerate's DeepSpeed plugin, which needs the "
                              "`transformers` package: pip install transformers (or set deepspeed.zero_stage=0)"
                              ) from e
        raise
    if plugin is not None and acc.distributed_type.value != "DEEPSPEED":
        raise ConfigError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} asked for, but Accelerate runs "
                          f"{acc.distributed_type.value} here (its DeepSpeed plugin needs GPUs); use "
                          "deepspeed.zero_stage=0 on this machine")
    # The real process group, not Accelerate's rank fields (they misreport under its DeepSpeed plugin on CPU).
    got = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if got != env.world_size:
        raise RuntimeError(f"launched as {env.world_size} processes but Accelerate's process group has {got}: the "
                           "ranks would train apart; launch with torchrun or `accelerate launch`")
    return acc


class AccelerateBackend:
    """An Accelerator (DDP or DeepSpeed plugin) behind the loop's handful of operations."""

    name = "accelerate"

    def __init__(self, model: nn.Module, groups: list[dict], cfg, env: DistEnv, universal: bool = False):
        self.acc = make_accelerator(cfg, env)
        self.env, self.precision, self.clip = env, cfg.precision, cfg.optim.clip
        # Accelerate names the CPU "cpu:0" under torchrun, which safetensors and torch.load's map_location refuse
        self.device: torch.device = torch.device("cpu") if self.acc.device.type == "cpu" else self.acc.device
        self.module = model.to(self.device)
        optimizer = build_optimizer(groups, cfg.optim, fused=self.device.type == "cuda")
        wrapped, self.optimizer = self.acc.prepare(self.module, optimizer)
        # compile after wrapping: DDP's reducer then overlaps the gradient all-reduce with the backward
        self.model = torch.compile(wrapped) if cfg.model.compile else wrapped
        self.plugin = self.acc.distributed_type.value == "DEEPSPEED"
        self.input_dtype = next(self.module.parameters()).dtype  # bf16 under the DeepSpeed plugin (no autocast)
        self._applied, self._norm = True, None

    @property
    def accumulation(self) -> int:
        return self.acc.gradient_accumulation_steps

    def _engine(self):
        return self.acc.deepspeed_engine_wrapped.engine

    def micro_step(self, x: torch.Tensor, targets: torch.Tensor, loss_fn, boundary: bool) -> torch.Tensor:
        """Forward, loss, backward (no gradient sync inside an accumulation window); at the boundary clip and
        step, or skip the step when the gradient norm is not finite."""
        with self.acc.accumulate(self.model):
            if self.acc.sync_gradients != boundary:
                raise RuntimeError("the loop and Accelerate disagree on the accumulation boundary")
            with self.acc.autocast():
                loss = loss_fn(self.model(x), targets)
            self.acc.backward(loss)  # divides by the accumulation; under the plugin the engine also steps here
            if boundary:
                self._boundary_step()
        return loss.detach()

    def _boundary_step(self) -> None:
        if self.plugin:  # the engine clipped and stepped (or skipped) inside backward
            self._applied = bool(self._engine().was_step_applied())
            norm = self._engine().get_global_grad_norm()
            self._norm = float(norm) if norm is not None else None
            return
        norm = self.acc.clip_grad_norm_(self.module.parameters(), self.clip if self.clip > 0 else math.inf)
        self._norm = float(norm)
        self._applied = math.isfinite(self._norm)
        if self._applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        set_lr(self.optimizer.param_groups, lr)

    def step_applied(self) -> bool:
        return self._applied

    def grad_norm(self) -> float | None:
        return self._norm

    def loss_scale(self) -> float | None:
        return None

    def eval_model(self) -> nn.Module:
        return self.module

    def eval_context(self) -> contextlib.AbstractContextManager:
        return self.acc.autocast()

    def eval_precision(self) -> str:
        """How this backend evaluates, recorded in weight files so that `eval` repeats it exactly."""
        if self.plugin:
            return self.precision
        return f"amp_{self.precision}" if self.precision in ("bf16", "fp16") else "fp32"

    def full_weights(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def save(self, ckpt_dir: Path, tag: str) -> None:
        """Write the model and optimizer into ckpt_dir/tag (every rank must call it)."""
        if self.plugin:
            self._engine().save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
            return
        if self.env.is_main:
            out = ckpt_dir / tag
            with atomic_path(out / MODEL_FILE) as tmp:
                save_file({k: v.detach().float().contiguous().cpu() for k, v in self.module.state_dict().items()},
                          str(tmp))
            with atomic_path(out / OPTIM_FILE) as tmp:
                torch.save(self.optimizer.optimizer.state_dict(), tmp)

    def load(self, ckpt_dir: Path, tag: str, universal: bool) -> None:
        """Restore model and optimizer from ckpt_dir/tag (data parallel: at any world size)."""
        src = ckpt_dir / tag
        if self.plugin:
            if universal:
                raise ConfigError("a fine-tuning checkpoint written under deepspeed.zero_stage=2 resumes only at "
                                  "the world size that wrote it; relaunch with that many processes")
            check_pickles(src, ())
            self._engine().load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True)
            return
        check_pickles(src, ())
        # read on the CPU: load_state_dict copies onto the model's device (and safetensors refuses names like
        # "cpu:0", the device Accelerate reports for multi-process CPU runs)
        sd = load_file(str(src / MODEL_FILE))
        self.module.load_state_dict({k: v.to(self.module.state_dict()[k].dtype) for k, v in sd.items()}, strict=True)
        optim = torch.load(src / OPTIM_FILE, map_location="cpu", weights_only=True)  # moved to the params' device
        self.optimizer.optimizer.load_state_dict(optim)
        barrier()

    def close(self) -> None:
        self.acc.end_training()


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a data-parallel checkpoint `tag`."""
    f = Path(ckpt_dir) / tag / MODEL_FILE
    if not f.exists():
        raise ConfigError(f"{f} is missing: checkpoints written under deepspeed.zero_stage=2 are not exported "
                          "here; use the run's best.safetensors or last.safetensors")
    return {k: v.float() for k, v in load_file(str(f)).items()}
