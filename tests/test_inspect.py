"""`python -m vit inspect` (vit/inspect.py) on constructed weights: each number means what the paper's figure says."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.stage_fixtures import accelerate_run_dir
from vit import VisionTransformer, vit_config
from vit.inspect import (
    attention_maps,
    attention_rollout,
    filter_components,
    mean_attention_distance,
    patch_distances,
    pos_similarity,
)
from vit.weights import save_weights

GRID, PATCH = (3, 5), 8  # a non-square grid: rows != cols


def _smooth_pos_embed(grid: tuple[int, int], dim: int = 64) -> torch.Tensor:
    """(1, 1 + N, D) position embeddings that are a smooth function of the 2-D position (Fourier features)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    xy = torch.stack([rows.flatten(), cols.flatten()], 1).float()  # (N, 2)
    freqs = torch.linspace(0.1, 0.6, dim // 4)
    angles = torch.cat([xy[:, :1] * freqs, xy[:, 1:] * freqs], 1)  # (N, D/2)
    pos = torch.cat([angles.sin(), angles.cos()], 1)  # (N, D)
    return torch.cat([torch.zeros(1, dim), pos])[None]


def test_smooth_pos_embed_neighbours_more_similar_than_far(tmp_path: Path) -> None:
    from vit.__main__ import main

    cfg = vit_config("debug", image_size=(GRID[0] * PATCH, GRID[1] * PATCH), width=64)
    model = VisionTransformer(cfg)
    with torch.no_grad():
        model.pos_embed.copy_(_smooth_pos_embed(GRID))
    weights = tmp_path / "w.safetensors"
    save_weights(weights, model.state_dict(), cfg, [str(i) for i in range(10)], 0)
    assert main(["inspect", str(weights), "--out", str(tmp_path / "out")]) == 0
    numbers = json.loads((tmp_path / "out" / "inspect.json").read_text())
    sim = torch.tensor(numbers["pos_embed_similarity"]["matrix"])  # (N, N)
    assert numbers["grid"] == list(GRID) and sim.shape == (15, 15)
    dist = patch_distances(GRID, 1)
    off = ~torch.eye(15, dtype=torch.bool)
    near, far = sim[(dist == 1) & off], sim[dist >= 3]
    assert near.min() > far.max()  # every neighbour pair is more similar than every far pair
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"embedding_filters.png", "pos_embed_similarity.png",
                                                              "inspect.json"}  # no images: no attention figures


def test_attention_distance_of_diagonal_and_uniform_heads() -> None:
    n = GRID[0] * GRID[1]
    t = n + 1
    attn = torch.zeros(2, 1, 2, t, t)  # (L, B, H, T, T)
    attn[:, :, 0] = torch.eye(t)  # head 0 attends to itself
    attn[:, :, 1] = 1.0 / t  # head 1 attends uniformly (class token included)
    d = mean_attention_distance(attn, GRID, PATCH)
    grid_mean = patch_distances(GRID, PATCH).mean().item()
    assert d[:, 0].tolist() == [0.0, 0.0]
    assert d[:, 1].tolist() == pytest.approx([grid_mean, grid_mean], rel=1e-6)
    # the grid's mean distance by hand: rows 8 px apart, columns 8 px apart
    pts = [(8 * i, 8 * j) for i in range(3) for j in range(5)]
    assert grid_mean == pytest.approx(sum(math.dist(a, b) for a in pts for b in pts) / n**2)


def test_rollout_of_identity_is_uniform_and_follows_attention() -> None:
    t = GRID[0] * GRID[1] + 1
    eye = torch.eye(t).expand(3, 2, 4, t, t)  # (L, B, H, T, T)
    for pool in ("token", "mean"):
        maps = attention_rollout(eye, pool)
        assert maps.shape == (2, t - 1) and torch.allclose(maps, torch.full_like(maps, 1 / (t - 1)))
    focus = torch.zeros(1, 1, 1, t, t)
    focus[..., :, 7] = 1.0  # every token attends to patch 6 only
    assert attention_rollout(focus)[0].argmax().item() == 6


def test_attention_maps_match_the_model_and_pca_explains_filters() -> None:
    cfg = vit_config("debug", image_size=(GRID[0] * PATCH, GRID[1] * PATCH))
    model = VisionTransformer(cfg).eval()
    x = torch.randn(2, 3, *cfg.image_hw)
    attn = attention_maps(model, x)
    assert attn.shape == (cfg.depth, 2, cfg.heads, 16, 16)
    assert torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    # recomputing block 0's attention output from the captured probabilities gives the fused kernel's output
    blk = model.blocks[0]
    h = blk.norm1(model.embed(x))
    v = blk.attn.qkv(h).view(2, 16, 3, cfg.heads, -1).permute(2, 0, 3, 1, 4)[2]  # (B, H, T, Dh)
    y = (attn[0] @ v).transpose(1, 2).reshape(2, 16, -1)
    assert torch.allclose(blk.attn.proj(y), blk.attn(h), atol=1e-5)
    comps, ratio = filter_components(model.patch_embed.weight, n=28)
    assert comps.shape == (28, 3, PATCH, PATCH) and ratio[0] >= ratio[-1] and 0 < ratio.sum() <= 1 + 1e-6
    assert pos_similarity(model.pos_embed).diagonal().allclose(torch.ones(15))


def test_inspect_with_images_writes_every_figure(digits_shards: Path, tmp_path: Path) -> None:
    from PIL import Image

    from vit.__main__ import main

    cfg = vit_config("debug", image_size=(32, 48))  # non-square: a 4 x 6 grid; digits are centre-cropped to it
    weights = tmp_path / "w.safetensors"
    save_weights(weights, VisionTransformer(cfg).state_dict(), cfg, [str(i) for i in range(10)], 0)
    for source in (digits_shards, tmp_path / "folder"):
        if source.name == "folder":
            source.mkdir()
            for i in range(3):
                Image.new("RGB", (40, 30), (80 * i, 20, 200)).save(source / f"{i}.png")
        out = tmp_path / f"out_{source.name}"
        assert main(["inspect", str(weights), "--images", str(source), "--out", str(out)]) == 0
        numbers = json.loads((out / "inspect.json").read_text())
        assert {p.name for p in out.glob("*.png")} == {f"{f}.png" for f in (
            "embedding_filters", "pos_embed_similarity", "attention_distance", "attention_rollout")}
        assert torch.tensor(numbers["attention_distance"]["pixels"]).shape == (cfg.depth, cfg.heads)
        maps = torch.tensor(numbers["attention_rollout"]["maps"])
        assert maps.shape[1:] == (4, 6) and maps.shape[0] == (8 if source == digits_shards else 3)
        assert torch.allclose(maps.sum((1, 2)), torch.ones(()), atol=1e-5)


def test_unreadable_files_are_skipped_and_named_and_a_run_dir_is_read(tmp_path: Path, capsys) -> None:
    """A folder of images with broken files among them draws the readable ones and names the others (it was a
    traceback); a folder of nothing readable is one line; a run dir is read as eval reads it (its latest
    checkpoint), where it was "a folder without a known layout"."""
    from PIL import Image

    from vit.__main__ import main

    cfg = vit_config("debug", image_size=32, num_classes=3)
    weights = save_weights(tmp_path / "w.safetensors", VisionTransformer(cfg).state_dict(), cfg, ["a", "b", "c"])
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (80 * i, 20, 200)).save(folder / f"{i}.jpg")
    (folder / "1b.jpg").write_bytes(b"not a jpeg")
    (folder / "2b.png").write_bytes(b"GIF89a")  # a header of another format, then nothing
    assert main(["inspect", str(weights), "--images", str(folder), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"note: skipped 2 file(s) that are not readable images: {folder / '1b.jpg'}, {folder / '2b.png'}" in err
    maps = json.loads((tmp_path / "out" / "inspect.json").read_text())["attention_rollout"]["maps"]
    assert len(maps) == 3
    for f in ("0.jpg", "1.jpg", "2.jpg"):
        (folder / f).unlink()
    assert main(["inspect", str(weights), "--images", str(folder), "--out", str(tmp_path / "out2")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: --images {folder} holds no readable image (.jpg, "
                                                       ".png, .webp) or labelled sample")
    run = accelerate_run_dir(tmp_path / "run", VisionTransformer(cfg).state_dict(), cfg, ["a", "b", "c"])
    assert main(["inspect", str(run), "--out", str(tmp_path / "out3")]) == 0
    assert json.loads((tmp_path / "out3" / "inspect.json").read_text())["pos_embed_similarity"]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_folder_images_are_prepared_as_the_eval_stream_prepares_them(tmp_path: Path, interpolation: str) -> None:
    """`--images FOLDER` and `--images SHARDS` of the same JPEGs give the same pixels: the weights' crop_pct and
    resize filter, through the eval transform's one implementation."""
    from tests.stream_fixtures import make_jpeg, write_dataset
    from vit.__main__ import _folder_images, _shard_images
    from vit.weights import EvalSettings

    shards = write_dataset(tmp_path / "ds", {"val": [5]})
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(make_jpeg(i)[0])  # the bytes write_dataset stored, in key order
    settings = EvalSettings((24, 32), crop_pct=0.8, interpolation=interpolation)
    got = _folder_images(folder, (24, 32), settings, 5)
    assert got.shape == (5, 3, 24, 32) and torch.equal(got, _shard_images(shards, (24, 32), settings, 5))
