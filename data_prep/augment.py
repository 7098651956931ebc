"""Batch-level augmentation the trainers call on device tensors: Mixup, CutMix and label smoothing.

These work on a whole (normalised, float) batch after it reached the device, pairing each sample with the
batch reversed (as timm's batch mode does), and return soft targets. A label of -1 (eval padding, or a
filler sample) gets an all-zero target row, so it adds nothing to a soft-target loss.
"""

from __future__ import annotations

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """int64 (B,) -> float32 (B, num_classes): `1 - smoothing + smoothing / K` on the label, `smoothing / K` off it."""
    valid = labels >= 0
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    targets.scatter_(1, labels.clamp(min=0).unsqueeze(1), 1.0 - smoothing + off)
    return targets * valid.unsqueeze(1)  # rows of label -1 -> 0


def _cutmix_box(h: int, w: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box of about (1 - lam) of the image area, centred uniformly, clipped to the image: (y0, y1, x0, x1)."""
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)


def mixup_cutmix(images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch with itself reversed; returns (images, soft targets float32 (B, num_classes)).

    images: float (B, C, H, W) on any device (normalise first); labels: int64 (B,). With probability `prob`
    one of Mixup (`lam ~ Beta(mixup_alpha, mixup_alpha)`, pixel blend) or CutMix (`lam ~ Beta(cutmix_alpha,
    cutmix_alpha)`, paste a box; lam corrected to the pasted area) is applied, CutMix with `switch_prob`
    when both alphas are > 0. An alpha of 0 disables that method. The input tensor is not modified.
    """
    if not images.is_floating_point():
        raise TypeError("mixup_cutmix expects float images: call normalize() on the uint8 batch first")
    rng = rng or np.random.default_rng()
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= prob:
        return images, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if cutmix else rng.beta(mixup_alpha, mixup_alpha))
    partner = images.flip(0)
    if cutmix:
        h, w = images.shape[-2:]
        y0, y1, x0, x1 = _cutmix_box(h, w, lam, rng)
        images = images.clone()
        images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = images * lam + partner * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of `-sum(targets * log_softmax(logits))`; all-zero rows contribute 0."""
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
