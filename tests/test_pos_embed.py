"""Position-embedding resampling against timm's, and its own contract."""

from __future__ import annotations

import math

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vit.pos_embed import resample_pos_embed


def _pos(grid: tuple[int, int], dim: int = 16, prefix: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(grid[0] * 100 + grid[1])
    return torch.randn(1, prefix + grid[0] * grid[1], dim, generator=g)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(
    "old,new", [((14, 14), (24, 24)), ((16, 16), (12, 12)), ((14, 14), (12, 20)), ((8, 12), (16, 10))]
)
def test_matches_timm(old: tuple[int, int], new: tuple[int, int], mode: str) -> None:
    pos = _pos(old)
    ours = resample_pos_embed(pos, new, old, num_prefix_tokens=1, mode=mode, antialias=True)
    ref = resample_abs_pos_embed(pos, list(new), list(old), num_prefix_tokens=1, interpolation=mode,
                                 antialias=True)
    assert ours.shape == (1, 1 + new[0] * new[1], 16)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_same_grid_is_identity_and_prefix_kept() -> None:
    pos = _pos((7, 7))
    assert resample_pos_embed(pos, 7) is pos
    out = resample_pos_embed(pos, (14, 14))
    assert torch.equal(out[:, :1], pos[:, :1])


def test_smooth_field_is_reproduced() -> None:
    # A smooth field sampled on a 4x4 grid, upsampled to 8x8, stays close to the same field sampled at 8x8.
    def field(n: int) -> torch.Tensor:
        c = (torch.arange(n) + 0.5) / n  # pixel-centre coordinates in [0, 1]
        y, x = torch.meshgrid(c, c, indexing="ij")
        f = torch.stack([torch.sin(math.pi * x), torch.cos(math.pi * y), torch.sin(math.pi * (x + y) / 2)], -1)
        return torch.cat([torch.full((1, 3), 9.0), f.reshape(n * n, 3)]).unsqueeze(0)

    out = resample_pos_embed(field(4), 8, mode="bicubic", antialias=False)
    inner = (out - field(8))[0, 1:].reshape(8, 8, 3)[2:-2, 2:-2]  # edges extrapolate; judge the interior
    assert inner.abs().max().item() < 0.05
    assert torch.equal(out[0, 0], torch.full((3,), 9.0))


def test_bf16_in_bf16_out() -> None:
    out = resample_pos_embed(_pos((4, 4)).bfloat16(), 6)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 37, 16)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match="not a square grid"):
        resample_pos_embed(_pos((4, 6)), 8)
    with pytest.raises(ValueError, match="old grid"):
        resample_pos_embed(_pos((4, 6)), 8, old_grid=(5, 5))
    with pytest.raises(ValueError, match="mode"):
        resample_pos_embed(_pos((4, 4)), 8, mode="nearest")
