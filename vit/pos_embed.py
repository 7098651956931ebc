"""Resampling learned position embeddings to a new patch grid (ViT paper, section 3.2).

Fine-tuning at a higher resolution keeps the patch size, so the sequence gets longer and the
pre-trained position embeddings no longer line up. They are reshaped to their 2-D grid and
interpolated; prefix tokens (the class token) have no position in the grid and are kept apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _as_grid(g: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (g, g) if isinstance(g, int) else (int(g[0]), int(g[1]))


def resample_pos_embed(
    pos: torch.Tensor,
    new_grid: int | tuple[int, int],
    old_grid: int | tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample `pos` of shape (1, prefix + H*W, D) to (1, prefix + H'*W', D).

    `old_grid` defaults to a square grid inferred from the length. Interpolation runs in fp32 and the
    result is cast back to `pos.dtype`. The same grid in gives the same tensor out.
    """
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"expected position embeddings of shape (1, tokens, dim), got {tuple(pos.shape)}")
    n_patch = pos.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_patch)
        if side * side != n_patch:
            raise ValueError(f"{n_patch} patch positions are not a square grid; pass old_grid=(rows, cols)")
        old_grid = side
    old_hw, new_hw = _as_grid(old_grid), _as_grid(new_grid)
    if old_hw[0] * old_hw[1] != n_patch:
        raise ValueError(
            f"old grid {old_hw} has {old_hw[0] * old_hw[1]} positions but the embedding has {n_patch} "
            f"(after {num_prefix_tokens} prefix tokens)"
        )
    if old_hw == new_hw:
        return pos
    prefix, patch = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    D = pos.shape[-1]
    grid = patch.float().reshape(1, *old_hw, D).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid = F.interpolate(grid, size=new_hw, mode=mode, antialias=antialias, align_corners=False)
    patch = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], D).to(pos.dtype)  # (1, H'W', D)
    return torch.cat([prefix, patch], dim=1)
