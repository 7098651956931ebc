"""Analytic FLOPs of a ViT, for MFU.

Counts multiply-adds as 2 FLOPs, matrix products only (norms, softmax and GELU are a few percent
of a percent). Training = forward + backward, where backward costs twice the forward for every
matmul whose input needs a gradient, and once for the patch embedding (the image needs none).
Attention scores and the attention-weighted sum are included; flash-attention's recompute is not
(MFU counts the model's FLOPs, not the kernel's).
"""

from __future__ import annotations

from vit.config import ViTConfig


def forward_flops(cfg: ViTConfig) -> dict[str, int]:
    """Forward FLOPs per image, by part."""
    N, D, M, T = cfg.num_patches, cfg.width, cfg.mlp_dim, cfg.num_patches + 1
    patch_in = cfg.in_chans * cfg.patch_size**2
    per_block = {
        "qkv": 2 * T * D * 3 * D,
        "attn": 2 * (2 * T * T * D),  # q @ k^T and attn @ v
        "proj": 2 * T * D * D,
        "mlp": 2 * (2 * T * D * M),
    }
    head_in = cfg.representation_size or D
    parts = {
        "patch_embed": 2 * N * patch_in * D,
        **{k: v * cfg.depth for k, v in per_block.items()},
        "pre_logits": 2 * D * cfg.representation_size if cfg.representation_size else 0,
        "head": 2 * head_in * cfg.num_classes,
    }
    return parts


def train_flops_per_image(cfg: ViTConfig) -> int:
    """Forward + backward FLOPs per training image."""
    parts = forward_flops(cfg)
    patch = parts.pop("patch_embed")
    return 3 * sum(parts.values()) + 2 * patch


def inference_flops_per_image(cfg: ViTConfig) -> int:
    """Forward FLOPs per image."""
    return sum(forward_flops(cfg).values())
