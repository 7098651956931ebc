"""DeepSpeed set-up: config generated from the recipe, optimizer parameter groups, LR schedule.

`build_engine` is the one function that turns a plain `VisionTransformer` into a distributed,
mixed-precision training engine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import deepspeed
import torch
from torch import nn

from pretrain.config import OptimCfg, PretrainConfig
from runtime.config import ConfigError
from runtime.dist import DistEnv, accumulation_steps


def deepspeed_config(cfg: PretrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON for a recipe, with the user's overlay (`deepspeed.config=path.json`) applied."""
    t, z = cfg.train, cfg.zero
    accum = accumulation_steps(t.global_batch, t.micro_batch, world_size)
    zero: dict = {
        "stage": z.stage,
        "overlap_comm": z.overlap_comm,
        "contiguous_gradients": z.contiguous_gradients,
        "reduce_bucket_size": z.reduce_bucket_size,
        "allgather_bucket_size": z.allgather_bucket_size,
    }
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ds = {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.clip,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}  # a NaN/inf gradient skips the step
        ds["data_types"] = {"grad_accum_dtype": "fp32"}  # accumulate micro-batch gradients in fp32
    elif cfg.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if torch.cuda.is_available():  # DeepSpeed's fused (or CPU-offload) AdamW; on CPU we pass torch's AdamW
        o = cfg.optim
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                       "weight_decay": o.weight_decay}}
    if cfg.deepspeed.config:
        ds = _overlay(ds, json.loads(Path(cfg.deepspeed.config).read_text()))
        _check_batch_keys(ds, world_size)
    return ds


def _overlay(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_batch_keys(ds: dict, world_size: int) -> None:
    g, m, a = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if g != m * a * world_size:
        raise ConfigError(
            f"DeepSpeed overlay gives train_batch_size {g} != micro {m} x accumulation {a} x world {world_size}; "
            "set batch sizes with train.global_batch / train.micro_batch instead of in the overlay"
        )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay for biases, norm weights (all 1-D tensors), class token, pos-embed."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, o: OptimCfg, total_steps: int) -> float:
    """LR at `step` as a fraction of the peak: linear warm-up, then linear or cosine decay to min_lr."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
    floor = o.min_lr / o.lr if o.lr else 0.0
    shape = 1.0 - progress if o.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * shape


def build_engine(model: nn.Module, cfg: PretrainConfig, env: DistEnv, total_steps: int, universal: bool = False):
    """Wrap `model` in a DeepSpeed engine with optimizer and per-step schedule; returns the engine.

    `universal`: the engine will load a universal checkpoint (resume at another world size).
    """
    ds_config = deepspeed_config(cfg, env.world_size)
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}
    groups = param_groups(model, cfg.optim.weight_decay)
    optimizer = None
    if "optimizer" not in ds_config:
        o = cfg.optim
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        ds_config["zero_allow_untested_optimizer"] = True

    def scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.optim, total_steps))

    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=False,
    )
    if cfg.model.compile:
        engine.compile()
    return engine
