"""Training pieces both trainers share: the LR schedule, the weight EMA and the exact top-k eval pass."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn


def lr_at(step: int, total: int, *, lr: float, warmup_steps: int, schedule: str, min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`: linear warm-up to `lr`, then a
    cosine, linear or constant schedule that ends at `min_lr`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_lr + (lr - min_lr) * shape


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


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return t
    nccl = torch_dist.get_backend() == "nccl"
    on = t.to(torch.device("cuda", torch.cuda.current_device())) if nccl else t.cpu()
    torch_dist.all_reduce(on)
    return on.to(t.device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, prepare: Callable[[torch.Tensor, torch.Tensor], tuple],
             autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict:
    """Exact top-1/top-5 and mean loss over an eval loader, summed over all ranks (every rank must call it).

    `prepare(images, labels) -> (inputs, labels)` moves a uint8 batch to the device and normalises it.
    Labels of -1 (the stream's padding that keeps ranks in step) are not counted; the forward still runs,
    since under ZeRO-3 a forward is a collective.
    """
    was_training = model.training
    model.eval()
    sums = None  # samples, top-1 hits, top-5 hits, loss sum
    for images, labels in loader:
        x, y = prepare(images, labels)
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(x).float()  # (B, K)
        if sums is None:
            sums = torch.zeros(4, dtype=torch.float64, device=logits.device)
        valid = y >= 0
        logits, y = logits[valid], y[valid]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (b, 5)
        hits = top == y[:, None]
        loss = F.cross_entropy(logits, y, reduction="sum") if len(y) else logits.sum()
        sums += torch.stack([torch.tensor(float(len(y)), device=logits.device, dtype=torch.float64),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), loss.double()])
    sums = _all_reduce(sums if sums is not None else torch.zeros(4, dtype=torch.float64))
    model.train(was_training)
    n = int(sums[0].item())
    if n == 0:
        raise RuntimeError("the eval split yielded no labelled sample; check the split name and the shards")
    return {"samples": n, "top1": sums[1].item() / n, "top5": sums[2].item() / n, "loss": sums[3].item() / n}
