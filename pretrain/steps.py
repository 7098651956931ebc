"""What happens inside one step: loss (fp32), exact top-k evaluation, EMA of weights."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from data_prep.stream import smooth_one_hot, soft_target_cross_entropy


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str, label_smoothing: float) -> torch.Tensor:
    """Mean loss in fp32. `targets`: (B,) class indices, or (B, C) soft targets (mixup: already smoothed).

    kind="softmax": cross-entropy with label smoothing; kind="sigmoid": per-class BCE summed over
    classes (big_vision's sigmoid loss).
    """
    logits = logits.float()  # (B, C): the loss is computed in fp32 whatever the model's precision
    if targets.ndim == 1:
        if kind == "softmax":
            return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
        targets = smooth_one_hot(targets, logits.shape[-1], label_smoothing)
    if kind == "softmax":
        return soft_target_cross_entropy(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none").sum(-1).mean()


def micro_step(engine, x: torch.Tensor, targets: torch.Tensor, kind: str, label_smoothing: float) -> torch.Tensor:
    """Forward, fp32 loss, backward and DeepSpeed step (applied at accumulation boundaries) for one micro-batch.

    Returns the loss, still on the device (reading it would make the host wait).
    """
    loss = classification_loss(engine(x), targets, kind, label_smoothing)
    engine.backward(loss)
    engine.step()
    return loss.detach()


@torch.no_grad()
def evaluate(model: nn.Module, loader, prepare) -> dict[str, float]:
    """Exact top-1/top-5 over an eval loader; label -1 marks padding and is not counted.

    `prepare(images, labels) -> (inputs, labels)` moves a batch to the device and normalises it.
    Sums are all-reduced, so every rank returns the job-wide figures.
    """
    was_training = model.training
    model.eval()
    totals = None
    for images, labels in loader:
        x, y = prepare(images, labels)
        logits = model(x).float()  # (B, C)
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices  # (B, k)
        valid = y >= 0
        hit = (top == y[:, None]) & valid[:, None]
        batch = torch.stack([hit[:, 0].sum(), hit.any(dim=-1).sum(), valid.sum()]).double()
        totals = batch if totals is None else totals + batch
    if totals is None:
        totals = torch.zeros(3, dtype=torch.float64)
    if torch_dist.is_initialized():
        totals = totals.to(_collective_device())
        torch_dist.all_reduce(totals)
    model.train(was_training)
    top1, top5, n = totals.tolist()
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "samples": int(n)}


def _collective_device() -> torch.device:
    nccl = torch_dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


class EMA:
    """Exponential moving average of the weights, kept in fp32 (the paper's Polyak averaging)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def load(self, shadow: dict[str, torch.Tensor]) -> None:
        for k, v in shadow.items():
            self.shadow[k].copy_(v)
