"""Optimiser pieces of fine-tuning: layer-wise LR decay groups, SGD/AdamW, the LR schedule and weight EMA.

Layer-wise LR decay (BEiT/MAE fine-tuning): the embeddings are layer 0, block i is layer i + 1, the final
norm and head are layer L + 1; layer l trains at lr * decay^(L + 1 - l), so the head moves fastest and the
patch embedding slowest. Biases, norm weights, the class token and the position embeddings get no
weight decay.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from finetune.config import OptimCfg


def layer_id(name: str, depth: int) -> int:
    """Depth of parameter `name` for layer-wise LR decay: 0 (embeddings) .. depth + 1 (final norm, head)."""
    if name.startswith(("patch_embed", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Parameter groups, one per (layer, decayed or not), each with an `lr_scale` the schedule multiplies in."""
    depth = len(model.blocks)
    skip = set(model.no_weight_decay())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name in skip  # biases, LayerNorm weights, cls_token, pos_embed
        lid = layer_id(name, depth)
        g = groups.setdefault((lid, no_wd), {"params": [], "names": [], "weight_decay": 0.0 if no_wd else weight_decay,
                                             "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg: OptimCfg) -> torch.optim.Optimizer:
    """SGD with momentum (the ViT paper) or AdamW (MAE-style), over layer-decay groups; fused kernels on GPU."""
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    for g in groups:
        del g["names"]  # optimisers keep unknown keys, but names are only for tests and debugging
    on_gpu = next(model.parameters()).is_cuda
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=on_gpu or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=on_gpu or None)


def lr_at(step: int, total: int, cfg: OptimCfg) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warm-up, then cosine/linear/constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to `lr` times its layer-decay scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class EMA:
    """Exponential moving average of the weights (Polyak averaging; the ViT paper fine-tunes with 0.9999).

    Kept in fp32 on the model's device. The effective decay warms up as min(decay, (1 + n) / (10 + n)) after
    n updates, so short runs average over their own steps instead of the random-init past.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.detach().float(), 1.0 - d)  # shadow = d * shadow + (1 - d) * v

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, torch.Tensor], updates: int) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)
        self.updates = updates
