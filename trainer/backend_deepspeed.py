"""The DeepSpeed backend: ZeRO 0-3, bf16/fp16/fp32, DeepSpeed's checkpoint layout and its universal format.

The only module that imports `deepspeed`. It wraps a plain `nn.Module` and the core's parameter groups in a
DeepSpeed engine and exposes the operations the loop needs (`trainer.backend.Backend`). The LR is set by
the loop before every step (the schedule counts applied steps; DeepSpeed's own scheduler would count
skipped ones too), so the engine gets no scheduler. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from runtime.config import ConfigError
from runtime.dist import DistEnv, accumulation_steps, barrier
from runtime.progress import progress_bar
from trainer.checkpoint import DEEPSPEED_GLOBALS, check_pickles
from trainer.optim import build_optimizer, set_lr

# `import deepspeed` imports mlflow when it is installed (our `mlflow` tracker extra, and `dev`), for an autotuner
# we never run: seconds of every rank's start (docs/performance.md). Hidden while deepspeed imports; DeepSpeed
# treats it as absent there, and the mlflow tracker imports it later as usual.
UNUSED_IMPORT = "mlflow"


@contextlib.contextmanager
def _hidden(module: str):
    """`import module` raises ImportError inside the block (the importer's optional path), unless it is
    already loaded; afterwards it imports as usual."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None
    try:
        yield
    finally:
        del sys.modules[module]


# DeepSpeed's ZeRO and bf16 optimizers import its Muon module, whichever optimizer runs; that module applies
# `torch.compile` to three functions as it is defined, which loads torch's inductor compiler: ~1.5-3 s of CPU
# in every rank (docs/performance.md). Imported here with compilation deferred to a function's first call.
UNUSED_COMPILED = "deepspeed.runtime.zero.muon.original_muon"


@contextlib.contextmanager
def _compile_on_first_call():
    """Inside the block, `torch.compile(fn, **kw)` returns a wrapper that compiles `fn` when first called (then
    runs the compiled function, as `torch.compile`'s result would); the real `torch.compile` is back after."""
    real = torch.compile

    def deferred(model=None, **kwargs):
        if model is None:  # used as `@torch.compile(...)`
            return lambda fn: deferred(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = real(model, **kwargs)
            return compiled(*args, **kw)
        return call

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = real


# DeepSpeed's logger writes to the stdout it finds at import: given stderr here, its lines (a warning on a machine
# without GPUs, among them) stay out of what the verbs print as their result (`export`: the file's path).
with _hidden(UNUSED_IMPORT), contextlib.redirect_stdout(sys.stderr):
    import deepspeed
    with _compile_on_first_call(), contextlib.suppress(ModuleNotFoundError):  # a DeepSpeed without Muon: nothing to do
        importlib.import_module(UNUSED_COMPILED)
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

# DeepSpeed's ZeRO optimizers gather partitions with `torch.distributed.all_gather_into_tensor`, which torch 2.14
# deprecates with a FutureWarning (shown by default): a line from every rank of every run about DeepSpeed's call,
# not ours, that no setting here changes. That message alone is hidden; every other warning shows.
DEEPSPEED_DEPRECATION = r"`torch\.distributed\.all_gather_into_tensor` is deprecated"
warnings.filterwarnings("ignore", message=DEEPSPEED_DEPRECATION, category=FutureWarning)

SAFE_GLOBALS = DEEPSPEED_GLOBALS


def deepspeed_config(cfg, world_size: int) -> dict:
    """The DeepSpeed JSON for a pre-training config, with the user's overlay (`deepspeed.config=path.json`)."""
    t, z = cfg.train, cfg.zero
    zero: dict = {"stage": z.stage, "overlap_comm": z.overlap_comm, "contiguous_gradients": z.contiguous_gradients,
                  "reduce_bucket_size": z.reduce_bucket_size, "allgather_bucket_size": z.allgather_bucket_size}
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds = {"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
          "gradient_accumulation_steps": accumulation_steps(t.global_batch, t.micro_batch, world_size),
          "gradient_clipping": cfg.optim.clip, "zero_optimization": zero,
          "steps_per_print": 1 << 30, "wall_clock_breakdown": False}  # we log ourselves
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}  # a NaN/inf gradient skips the step
        ds["data_types"] = {"grad_accum_dtype": "fp32"}  # accumulate micro-batch gradients in fp32
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if torch.cuda.is_available() and cfg.optim.name == "adamw":  # DeepSpeed's fused (or CPU-offload) AdamW
        o = cfg.optim
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                       "weight_decay": o.weight_decay}}
    if cfg.deepspeed.config:
        ds = _overlay(ds, json.loads(Path(cfg.deepspeed.config).read_text()))
        g, m, a = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        if g != m * a * world_size:
            raise ConfigError(f"DeepSpeed overlay gives train_batch_size {g} != micro {m} x accumulation {a} x world "
                              f"{world_size}; set batch sizes with train.global_batch / train.micro_batch instead")
    return ds


def _overlay(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedBackend:
    """A DeepSpeed engine behind the loop's handful of operations."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, groups: list[dict], cfg, env: DistEnv, universal: bool = False):
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=cfg.dist.timeout))
        ds_config = deepspeed_config(cfg, env.world_size)
        if universal:  # resuming at another world size: the checkpoint is loaded in its universal form
            ds_config["checkpoint"] = {"load_universal": True}
        optimizer = None
        if "optimizer" not in ds_config:
            optimizer = build_optimizer(groups, cfg.optim)
            ds_config["zero_allow_untested_optimizer"] = True
        params = [{k: v for k, v in g.items() if k != "names"} for g in groups]
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, model_parameters=params,
                                                    config=ds_config, dist_init_required=False)
        if cfg.model.compile:  # after wrapping, so that the engine's hooks see the compiled graph's gradients
            self.engine.compile()
        self.env, self.zero_stage, self.precision = env, cfg.zero.stage, cfg.precision
        self.module: nn.Module = self.engine.module
        self.device: torch.device = self.engine.device
        self.input_dtype = next(self.module.parameters()).dtype  # bf16/fp16 parameters: no autocast

    @property
    def accumulation(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def micro_step(self, x: torch.Tensor, targets: torch.Tensor, loss_fn, boundary: bool) -> torch.Tensor:
        """Forward, loss, backward; at the accumulation boundary also clip and step (skipped if non-finite)."""
        if boundary != self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("the loop and the DeepSpeed engine disagree on the accumulation boundary")
        loss = loss_fn(self.engine(x), targets)
        self.engine.backward(loss)
        self.engine.step()
        return loss.detach()

    def set_lr(self, lr: float) -> None:
        set_lr(self.engine.optimizer.param_groups, lr)

    def step_applied(self) -> bool:
        return bool(self.engine.was_step_applied())

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else None

    def loss_scale(self) -> float | None:
        return getattr(self.engine.optimizer, "cur_scale", None) if self.precision == "fp16" else None

    def eval_model(self) -> nn.Module:
        return self.engine  # under ZeRO-3 a forward gathers the weights: every rank must run it

    def eval_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def eval_precision(self) -> str:
        """How this backend evaluates, recorded in weight files so that `eval` repeats it exactly."""
        return self.precision if self.precision in ("bf16", "fp16") else "fp32"

    def full_weights(self) -> dict[str, torch.Tensor] | None:
        """This rank's full model weights (None under ZeRO-3, where no rank holds them)."""
        return None if self.zero_stage == 3 else self.module.state_dict()

    def save(self, ckpt_dir: Path, tag: str) -> None:
        """Write this rank's engine files into ckpt_dir/tag (a collective); raises OSError/RuntimeError."""
        client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        try:
            self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
        except (OSError, RuntimeError):
            # DeepSpeed's save ends in a barrier that this rank skipped by raising (ZeRO <= 2 has no other
            # collective after its writes begin): stand in for it, so peers that wrote fine are not left waiting.
            barrier()
            raise

    def load(self, ckpt_dir: Path, tag: str, universal: bool) -> None:
        """Restore model and optimizer from ckpt_dir/tag; `universal`: saved at another world size."""
        check_pickles(ckpt_dir / tag, SAFE_GLOBALS)  # DeepSpeed unpickles without restriction: check first
        if universal:
            if self.env.is_main:
                convert_universal(ckpt_dir, tag)
            barrier()
            tag = f"{tag}_universal"
        path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")

    def close(self) -> None:
        self.engine.destroy()  # frees the engine's buffers and hooks; the process group stays the core's


def convert_universal(ckpt_dir: Path, tag: str) -> Path:
    """Convert checkpoint `tag` to DeepSpeed's universal format (one folder per parameter), once."""
    src, dst = Path(ckpt_dir) / tag, Path(ckpt_dir) / f"{tag}_universal"
    check_pickles(src, SAFE_GLOBALS)  # ds_to_universal unpickles without restriction
    if not (dst / "zero").exists():
        tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")  # the ranks of a fine-tuning job may convert at once
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"universal checkpoint conversion failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        try:
            tmp.rename(dst)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def consolidate(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of DeepSpeed checkpoint `tag`, from any ZeRO stage and precision (run on one process)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    check_pickles(Path(ckpt_dir) / tag, SAFE_GLOBALS)  # zero_to_fp32 unpickles without restriction
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its progress prints are not the verb's result
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except ValueError:  # bf16 with ZeRO 0/1 uses DeepSpeed's BF16_Optimizer, which zero_to_fp32 cannot read
        zero = convert_universal(ckpt_dir, tag) / "zero"
        files = [p for p in sorted(zero.iterdir()) if (p / "fp32.pt").exists()]  # one folder per parameter
        sd = {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=True)["param"]
              for p in progress_bar(files, desc="consolidate", unit="param")}
    return {k: v.float() for k, v in sd.items()}



def model_states_bytes(stage: int, params: int, largest_layer: int, gpus_per_node: int, nodes: int) -> int:
    """Model-state bytes per GPU at ZeRO `stage` (bf16 weights, fp32 gradient accumulation, fp32 master + Adam).

    Stages 2 and 3 are DeepSpeed's own estimators (no offload, with their 1.5 buffer factor on the CPU side
    only); stages 0 and 1 follow the same per-parameter terms: 2 bf16 weights + 2 bf16 and 4 fp32 gradients,
    unpartitioned, + 4 fp32 master weights and 8 Adam moments, partitioned over the ranks at stage 1."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gpus = gpus_per_node * nodes
    if stage == 2:
        return estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)[1]
    if stage == 3:
        return estimate_zero3_model_states_mem_needs(params, largest_layer, gpus_per_node, nodes, cpu_offload=False,
                                                     cpu_offload_params=False)[1]
    return 8 * params + (12 * params if stage == 0 else 12 * params // gpus)
