"""What a ViT learned, as the paper shows it (Dosovitskiy et al., 2021, figures 6 and 7).

- `embedding_filters`: the first principal components of the patch projection's filters (fig. 7 left);
- `pos_embed_similarity`: cosine similarity of each patch's position embedding to all others, one tile per
  position (fig. 7 centre): the 2-D grid structure emerges in training;
- `attention_distance`: per head and layer, the mean distance in pixels between a patch and the patches it
  attends to, weighted by attention (fig. 7 right), from a batch of images;
- `attention_rollout`: Abnar & Zuidema's rollout (residual-mixed, head-averaged attention multiplied through
  the layers), the class token's (or, for mean pooling, the patches' mean) share of each patch (fig. 6).

All use the model's own grid (non-square grids and resampled position embeddings included). The numbers are
plain functions (tested on constructed weights); the figures are matplotlib (Agg) and go to PNG files
(`python -m vit inspect`) or TensorBoard (`inspect/<figure>` at each training eval).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from vit.model import VisionTransformer

FIGURES = ("embedding_filters", "pos_embed_similarity", "attention_distance", "attention_rollout")


# ---- numbers ------------------------------------------------------------------------------------------------
def filter_components(weight: torch.Tensor, n: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """(first n principal components of the patch filters (n, C, P, P), their explained variance ratios (n,)).

    weight: the patch projection (D, C, P, P), i.e. D filters of C x P x P pixels.
    """
    d = weight.shape[0]
    x = weight.detach().double().reshape(d, -1)  # (D, C*P*P)
    _, s, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)  # vh (r, C*P*P)
    n = min(n, vh.shape[0])
    ratio = s**2 / (s**2).sum().clamp(min=1e-30)
    return vh[:n].reshape(n, *weight.shape[1:]).float(), ratio[:n].float()


def pos_similarity(pos_embed: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (N, N) of the patches' position embeddings; pos_embed (1, N+1, D) with the class
    token's first (left out) or (N, D)."""
    p = pos_embed.detach().float().reshape(-1, pos_embed.shape[-1])
    p = p[1:] if pos_embed.dim() == 3 else p  # (N, D)
    p = torch.nn.functional.normalize(p, dim=1)
    return p @ p.T  # (N, N)


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Pixel distance (N, N) between the centres of every two patches of a (rows, cols) grid."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    xy = torch.stack([rows.flatten(), cols.flatten()], 1).double() * patch_size  # (N, 2)
    return torch.cdist(xy, xy)


def mean_attention_distance(attn: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(L, H) mean attention distance in pixels from attention (L, B, H, T, T), T = 1 + N (class token first).

    Patch-to-patch attention only, each query's weights renormalised over the patches, averaged over the
    queries and images: a head attending to itself scores 0, a uniform head the grid's mean distance.
    """
    a = attn[..., 1:, 1:].double()  # (L, B, H, N, N)
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-30)
    d = (a * patch_distances(grid, patch_size)).sum(-1)  # (L, B, H, N)
    return d.mean(dim=(1, 3)).float()


def attention_rollout(attn: torch.Tensor, pool: str = "token") -> torch.Tensor:
    """(B, N) rollout maps (summing to 1) from attention (L, B, H, T, T).

    Per layer: heads averaged, the residual added (0.5 A + 0.5 I, rows renormalised), the layers multiplied.
    The map is the class token's row over the patches (pool="token") or the patches' mean row (pool="mean").
    A map with no weight on any patch (e.g. identity attention: the class token only sees itself) is uniform.
    """
    _, b, _, t, _ = attn.shape
    eye = torch.eye(t, dtype=torch.float64)
    r = eye.expand(b, t, t)
    for layer in attn.double():
        a = 0.5 * layer.mean(1) + 0.5 * eye  # (B, T, T)
        r = (a / a.sum(-1, keepdim=True)) @ r
    m = r[:, 0, 1:] if pool == "token" else r[:, 1:, 1:].mean(1)  # (B, N)
    s = m.sum(-1, keepdim=True)
    uniform = torch.full_like(m, 1.0 / m.shape[1])
    return torch.where(s > 1e-12, m / s.clamp(min=1e-30), uniform).float()


@torch.no_grad()
def attention_maps(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention (L, B, H, T, T) of every block for normalised images x (B, C, H, W): each block's
    attention input is captured by a hook and its probabilities recomputed (the model uses a fused kernel)."""
    maps, hooks = [], []

    def capture(attn, inputs, _out):
        h = inputs[0]  # (B, T, D)
        b, t, d = h.shape
        qkv = attn.qkv(h).view(b, t, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        q, k = qkv[0], qkv[1]
        maps.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1).float().cpu())

    for block in model.blocks:
        hooks.append(block.attn.register_forward_hook(capture))
    was_training = model.training
    try:
        model.eval()
        model.forward_features(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return torch.stack(maps)  # (L, B, H, T, T)


def normalise_images(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) as the model was trained."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def inspect_model(model: VisionTransformer, images: torch.Tensor | None = None,
                  mean_std: tuple = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))) -> tuple[dict, dict]:
    """(numbers, {figure name: matplotlib Figure}) of a model; the attention figures need images (uint8,
    (B, 3, H, W) at the model's size; up to 8 are used)."""
    from vit import inspect_plots as plots

    cfg = model.cfg
    model = model.float().cpu()
    comps, ratio = filter_components(model.patch_embed.weight)
    sim = pos_similarity(model.pos_embed)
    numbers = {"image_size": list(cfg.image_hw), "grid": list(cfg.grid), "patch_size": cfg.patch_size,
               "embedding_filters": {"explained_variance": ratio.tolist()},
               "pos_embed_similarity": {"matrix": sim.tolist()}}
    figures = {"embedding_filters": plots.filters_figure(comps, ratio),
               "pos_embed_similarity": plots.similarity_figure(sim, cfg.grid)}
    if images is not None and len(images):
        images = images[:8]
        attn = attention_maps(model, normalise_images(images, *mean_std))
        dist = mean_attention_distance(attn, cfg.grid, cfg.patch_size)
        maps = attention_rollout(attn, cfg.pool).reshape(-1, *cfg.grid)
        numbers["attention_distance"] = {"pixels": dist.tolist(), "images": len(images),
                                         "grid_mean": patch_distances(cfg.grid, cfg.patch_size).mean().item()}
        numbers["attention_rollout"] = {"maps": maps.tolist()}
        figures["attention_distance"] = plots.distance_figure(dist, cfg.image_hw)
        figures["attention_rollout"] = plots.rollout_figure(images, maps)
    return numbers, figures


def figure_rgb(fig) -> torch.Tensor:
    """A matplotlib figure as a uint8 (3, H, W) tensor (for TensorBoard); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)
    plt.close(fig)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def write_inspection(out: str | Path, numbers: dict, figures: dict) -> list[Path]:
    """Write `<figure>.png` and `inspect.json` into `out`; returns the files written."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(out / f"{name}.png")
    (out / "inspect.json").write_text(json.dumps(numbers))
    return [*written, out / "inspect.json"]
