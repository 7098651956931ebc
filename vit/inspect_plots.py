"""The matplotlib figures of `vit.inspect` (imported only when a figure is drawn: matplotlib is slow to load)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files and TensorBoard only: no display, and safe in worker processes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _mosaic(tiles: list[np.ndarray], cols: int, gap: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Equal-size RGB tiles (h, w, 3) in [0, 1] laid out `cols` per row on white, `gap` pixels apart; returns
    (the mosaic, each tile's top-left (y, x)). One imshow of this draws in a fraction of the time of one
    subplot per tile (these figures are drawn at every eval)."""
    h, w, _ = tiles[0].shape
    rows = max(1, -(-len(tiles) // cols))
    mosaic = np.ones((rows * (h + gap) + gap, min(cols, len(tiles)) * (w + gap) + gap, 3))
    corners = [(gap + (i // cols) * (h + gap), gap + (i % cols) * (w + gap)) for i in range(len(tiles))]
    for tile, (y, x) in zip(tiles, corners, strict=True):
        mosaic[y:y + h, x:x + w] = tile
    return mosaic, corners


def filters_figure(comps: torch.Tensor, ratio: torch.Tensor):
    """The principal components (n, C, P, P) as small RGB images, 7 per row, each scaled to [0, 1]."""
    n, channels, p, _ = comps.shape
    cols = 7
    tiles = [_unit(c.transpose(1, 2, 0) if channels == 3 else np.repeat(c.mean(0)[..., None], 3, -1))
             for c in comps.numpy()]  # (P, P, 3) each; gray when the input is not RGB
    mosaic, corners = _mosaic(tiles, cols, gap=max(2, p // 3))
    rows = max(1, -(-n // cols))
    fig, ax = plt.subplots(figsize=(cols * 1.1, rows * 1.25 + 0.4))
    ax.imshow(mosaic, interpolation="nearest")
    for i, (y, x) in enumerate(corners):
        ax.text(x + p / 2 - 0.5, y - 0.6, f"{ratio[i]:.1%}", fontsize=6, ha="center", va="bottom")
    ax.axis("off")
    fig.suptitle("RGB embedding filters (first principal components)", fontsize=9)
    return fig


def similarity_figure(sim: torch.Tensor, grid: tuple[int, int]):
    """One tile per patch position (rows x cols of tiles), each its similarity to every position."""
    gh, gw = grid
    mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
    for i in range(gh):
        for j in range(gw):
            tile = sim[i * gw + j].reshape(gh, gw).numpy()
            mosaic[i * (gh + 1):i * (gh + 1) + gh, j * (gw + 1):j * (gw + 1) + gw] = tile
    fig, ax = plt.subplots(figsize=(6, 6 * gh / gw + 0.5))
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_xticks([j * (gw + 1) + gw / 2 - 0.5 for j in range(gw)], [str(j + 1) for j in range(gw)], fontsize=6)
    ax.set_yticks([i * (gh + 1) + gh / 2 - 0.5 for i in range(gh)], [str(i + 1) for i in range(gh)], fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    ax.set_title("Position embedding similarity", fontsize=9)
    return fig


def distance_figure(dist: torch.Tensor, image_hw: tuple[int, int]):
    """Mean attention distance (pixels) of every head (dots) against the layer."""
    layers, heads = dist.shape
    fig, ax = plt.subplots(figsize=(5, 4))
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), dist[:, h].numpy(), s=12, label=f"head {h + 1}" if heads <= 16 else None)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, float(np.hypot(*image_hw)) / 2)
    if heads <= 16:
        ax.legend(fontsize=5, ncol=2)
    ax.set_title("Mean attention distance per head", fontsize=9)
    return fig


def rollout_figure(images: torch.Tensor, maps: torch.Tensor):
    """Each image (uint8 (B, 3, H, W)) above its rollout map (B, gh, gw), upsampled and overlaid."""
    b = images.shape[0]
    size = images.shape[-2:]
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    rgb = [img.permute(1, 2, 0).numpy() / 255 for img in images]  # (H, W, 3) in [0, 1]
    jet = plt.get_cmap("jet")
    heat = [jet(_unit(m.numpy()))[..., :3] for m in up]
    overlays = [0.5 * im + 0.5 * hm for im, hm in zip(rgb, heat, strict=True)]  # the map at alpha 0.5 over its image
    mosaic, _ = _mosaic(rgb + overlays, cols=b, gap=max(1, size[0] // 16))
    fig, ax = plt.subplots(figsize=(1.6 * b, 3.4))
    ax.imshow(mosaic, interpolation="nearest")
    ax.axis("off")
    fig.suptitle("Attention rollout (input, attention)", fontsize=9)
    return fig
