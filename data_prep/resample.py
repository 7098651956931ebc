"""Batched crop + resize with PIL's own antialiased filters and arithmetic, for decode="gpu" (data_prep/gpu_decode.py).

PIL resizes a box of an image separably: each output column is a weighted sum of a window of input columns (the
filter, widened by the downscale factor so that it averages every input pixel it covers, cut at the image's edges
and normalised to sum 1), then the same over rows. It computes in fixed point: weights rounded to 22 fractional
bits, sums of int32 rounded half up, the horizontal pass's result clipped to uint8 before the vertical pass.

Here the same arithmetic runs over a whole micro-batch at once: per image and output pixel the window's first
input index and its weights (the crop offset and size, the flip and the image's own size folded in), then one
gather + multiply-add per filter tap over the batch padded to one size (a tap past an image's edge has weight 0,
so the padding is never read). The result is PIL's bytes for the same decoded pixels (the CPU path's
`crop_resize_pil`), bilinear and bicubic alike; integer arithmetic, so no float mode (TF32, fast FP64) changes it.
"""

from __future__ import annotations

import math

import torch

BICUBIC_A = -0.5  # PIL's (and Keys') bicubic coefficient
FRACTION_BITS = 22  # PIL's fixed point for 8-bit images: 32 bits less 8 for the pixel and 2 of headroom


def _bilinear(t: torch.Tensor) -> torch.Tensor:
    return (1.0 - t.abs()).clamp_(min=0.0)


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    a, t = BICUBIC_A, t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0  # |t| < 1
    far = ((t - 5.0) * t + 8.0) * t * a - 4.0 * a  # 1 <= |t| < 2
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}  # kernel, support at scale 1


def taps(max_scale: float, interpolation: str) -> int:
    """How many input pixels one output pixel's window can span when an axis is shrunk `max_scale` times."""
    return math.ceil(2.0 * FILTERS[interpolation][1] * max(max_scale, 1.0)) + 2


def window_weights(start: torch.Tensor, length: torch.Tensor, extent: torch.Tensor, out: int, n_taps: int,
                   interpolation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's windows for resampling input positions [start, start + length) of an axis `extent` pixels long
    onto `out` pixels, per image: (index (B, out, n_taps) long, weight (B, out, n_taps) int32 fixed point).

    start, length, extent: (B,) on the target device (PIL's box convention: pixel i spans [i, i + 1)).
    """
    kernel, support = FILTERS[interpolation]
    start, length, extent = (v.to(torch.float64).view(-1, 1, 1) for v in (start, length, extent))
    scale = length / out  # input pixels per output pixel
    widen = scale.clamp(min=1.0)  # a downscale widens the filter over every input pixel it covers
    reach = support * widen
    centre = start + (torch.arange(out, dtype=torch.float64, device=start.device).view(1, -1, 1) + 0.5) * scale
    first = (centre - reach + 0.5).floor().clamp(min=0.0)  # PIL's window: [first, last), cut to the image
    last = torch.minimum((centre + reach + 0.5).floor(), extent)
    x = first + torch.arange(n_taps, dtype=torch.float64, device=start.device).view(1, 1, -1)  # (B, out, n_taps)
    w = kernel((x - centre + 0.5) / widen) * (x < last)
    total = w.sum(-1, keepdim=True)
    w = w / torch.where(total == 0, torch.ones_like(total), total)
    one = float(1 << FRACTION_BITS)  # rounded half away from zero, as PIL does
    fixed = torch.where(w < 0, (w * one - 0.5).ceil(), (w * one + 0.5).floor()).to(torch.int32)
    index = torch.minimum(x, extent - 1).to(torch.long)  # taps past the window (weight 0) stay inside the image
    return index, fixed


def _pass(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """int32 (B, L, R) resampled along L: out[b, j] = clip8(sum_t weight[b, j, t] * x[b, index[b, j, t]])."""
    b, length, r = x.shape
    rows = (index + torch.arange(b, device=x.device).view(-1, 1, 1) * length).view(b, -1, index.shape[2])
    flat = x.reshape(b * length, r)  # row k of image i: flat[i * length + k]
    acc = torch.full((b, index.shape[1], r), 1 << (FRACTION_BITS - 1), dtype=torch.int32,
                     device=x.device)  # PIL starts its sums at one half: rounding half up
    for t in range(index.shape[2]):  # a gather of whole rows and a fused multiply-add per tap
        acc.addcmul_(weight[:, :, t, None], flat.index_select(0, rows[:, :, t].reshape(-1)).view_as(acc))
    return acc.bitwise_right_shift_(FRACTION_BITS).clamp_(0, 255)


def resample_batch(padded: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                   size: tuple[int, int], interpolation: str, max_scale: float) -> torch.Tensor:
    """Crop `boxes` of `padded` images, resize each to `size` (h, w) with PIL's `interpolation`, flip where
    `flips`: uint8 (B, 3, h, w).

    padded: uint8 (B, Wmax, 3, Hmax), image i's column x, channel c, row y at [i, x, c, y] (sizes[i] = (h_i,
    w_i)), anything past it ignored; boxes: (B, 4) as (left, top, width, height); flips: (B,) bool; all on the
    device of `padded` (a copy from the host here would wait for the device's queued work). max_scale: the
    largest box side / output side (from the host, so that no device value is read back).
    """
    b, wp, c, hp = padded.shape
    th, tw = size
    n = taps(max_scale, interpolation)
    ix, wx = window_weights(boxes[:, 0], boxes[:, 2], sizes[:, 1], tw, n, interpolation)  # (B, tw, n)
    flip = flips.view(-1, 1, 1)
    ix, wx = torch.where(flip, ix.flip(1), ix), torch.where(flip, wx.flip(1), wx)  # a flip reverses the columns
    iy, wy = window_weights(boxes[:, 1], boxes[:, 3], sizes[:, 0], th, n, interpolation)  # (B, th, n)
    rows = _pass(padded.view(b, wp, c * hp).to(torch.int32), ix, wx)  # (B, tw, 3*H): the horizontal pass
    rows = rows.view(b, tw, c, hp).permute(0, 3, 2, 1).reshape(b, hp, c * tw)  # (B, H, 3*tw)
    out = _pass(rows, iy, wy)  # (B, th, 3*tw): the vertical pass
    return out.view(b, th, c, tw).permute(0, 2, 1, 3).to(torch.uint8, memory_format=torch.contiguous_format)
