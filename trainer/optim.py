"""One optimizer builder for every stage: parameter groups from the model's own declaration, the LR
schedule (counted in applied steps), and the weight EMA.

The model declares its groups (`group_matcher()`: regexes naming the embeddings and the numbered blocks) and
what must not be decayed (`no_weight_decay()`); every 1-D tensor (biases, norm weights) is undecayed too.
Layer-wise LR decay (BEiT/MAE fine-tuning): layer l of L + 1 trains at lr * decay^(L + 1 - l), so the head
moves fastest and the patch embedding slowest. See docs/architecture.md.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from trainer.config import OptimCfg


def layer_of(name: str, matcher: dict[str, str], depth: int) -> int:
    """Depth of parameter `name`: 0 (embeddings) .. depth + 1 (final norm, head)."""
    if re.match(matcher["embed"], name):
        return 0
    if m := re.match(matcher["blocks"], name):
        return int(m.group(1)) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Parameter groups, one per (layer, decayed or not), each with the `lr_scale` that `set_lr` multiplies in.

    With layer_decay 1 every group has scale 1 and only the decay split matters."""
    matcher = model.group_matcher()
    depth = len(model.blocks)
    skip = set(model.no_weight_decay())
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = p.ndim <= 1 or name in skip
        # without layer decay every layer has scale 1: two groups (fewer flat buffers under ZeRO)
        layer = layer_of(name, matcher, depth) if layer_decay != 1.0 else depth + 1
        scale = layer_decay ** (depth + 1 - layer)
        g = groups.setdefault((layer, no_wd), {"params": [], "names": [], "lr_scale": scale,
                                               "weight_decay": 0.0 if no_wd else weight_decay})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict], cfg: OptimCfg, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over `groups` (names dropped); fused kernels where asked (GPU)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def lr_at(step: int, total: int, cfg: OptimCfg) -> float:
    """Learning rate for applied optimizer step `step` (0-based) of `total`: linear warm-up to `lr`, then a
    cosine, linear or constant schedule that ends at `min_lr`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


def set_lr(param_groups: list[dict], lr: float) -> None:
    """Set every group's learning rate to `lr` times its layer-decay scale."""
    for g in param_groups:
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
