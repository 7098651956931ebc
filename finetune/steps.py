"""One fine-tuning micro-step and the evaluation pass, shared by the trainer, `finetune eval` and the benchmark.

Inputs arrive as uint8 (B, 3, H, W) batches from `data_prep.stream`; they are normalised on the device here.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_prep.stream import mixup_cutmix, normalize, soft_target_cross_entropy
from finetune.optim import set_lr


def micro_step(accelerator, model: nn.Module, optimizer, images: torch.Tensor, labels: torch.Tensor, *,
               num_classes: int, lr: float, clip: float, label_smoothing: float = 0.0, mixup: float = 0.0,
               cutmix: float = 0.0, input_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Forward + backward of one micro-batch; at the accumulation boundary also clip, set the LR and step.

    Returns the (detached) loss on the device: reading it is left to the caller, so no host sync here.
    `input_dtype` is the model's parameter dtype under DeepSpeed bf16 (it runs without autocast).
    """
    x = normalize(images, dtype=torch.float32, device=accelerator.device)  # (B, 3, H, W)
    y = labels.to(accelerator.device, non_blocking=True)  # (B,)
    with accelerator.accumulate(model):
        if mixup > 0 or cutmix > 0:
            x, targets = mixup_cutmix(x, y, num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix,
                                      label_smoothing=label_smoothing)
        with accelerator.autocast():
            logits = model(x.to(input_dtype))  # (B, K)
        if mixup > 0 or cutmix > 0:
            loss = soft_target_cross_entropy(logits, targets)
        else:
            loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            set_lr(optimizer, lr)
            if clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _world() -> int:
    # The real process group, not Accelerate's rank fields (they misreport under its DeepSpeed plugin on CPU).
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if _world() > 1:
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (every rank must call this)."""
    return _all_reduce(t.clone()) / _world()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device | str, *, autocast=None,
             input_dtype: torch.dtype = torch.float32) -> dict:
    """Top-1/top-5 accuracy and mean loss over an eval loader, summed over all ranks.

    Labels of -1 (padding that keeps ranks in step) are not counted. Every rank must call this.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # samples, top-1 hits, top-5 hits, loss sum
    for images, labels in loader:
        x = normalize(images, dtype=torch.float32, device=device).to(input_dtype)
        y = labels.to(device)
        with autocast() if autocast else contextlib.nullcontext():
            logits = model(x).float()  # (B, K)
        valid = y >= 0
        if not valid.any():
            continue
        logits, y = logits[valid], y[valid]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (b, 5)
        hits = top == y[:, None]
        sums += torch.stack([torch.tensor(float(len(y)), device=device), hits[:, 0].sum().double(),
                             hits.any(dim=1).sum().double(), F.cross_entropy(logits, y, reduction="sum").double()])
    sums = _all_reduce(sums)
    model.train(was_training)
    n = int(sums[0].item())
    if n == 0:
        raise RuntimeError("the eval split yielded no labelled sample; check data.val_split")
    return {"samples": n, "top1": sums[1].item() / n, "top5": sums[2].item() / n, "loss": sums[3].item() / n}
