"""The training loss of both stages, always computed in fp32 (see docs/architecture.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
