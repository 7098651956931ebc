"""Fine-tuning's test data: sklearn digits as data_prep shards with held-out splits, and a debug ViT pre-trained
on one of them at 16 px (tests/test_finetune_train.py)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from tests.conftest import ROOT

PY = sys.executable
SIZE = 32  # stored image size; pre-training crops to 16, fine-tuning to 32
SPLITS = {"pretrain": (0, 900), "train": (900, 1400), "val": (1400, 1797)}  # held-out splits of 1797 digits


def write_shards(folder: Path) -> Path:
    """sklearn digits at 32 px as an ImageFolder tree, then shards written by `python -m data_prep write` from a
    CSV list that assigns the held-out splits."""
    from data_prep.examples import write_example_images

    tree = write_example_images(folder / "images", "digits", size=SIZE)
    files = sorted(tree.rglob("*.png"))
    order = np.random.default_rng(0).permutation(len(files))
    bounds = [(name, lo, hi) for name, (lo, hi) in SPLITS.items()]
    with open(folder / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"])
        for pos, i in enumerate(order):
            split = next(name for name, lo, hi in bounds if lo <= pos < hi)
            w.writerow([files[i].relative_to(folder), files[i].parent.name, split])
    proc = subprocess.run([PY, "-m", "data_prep", "write", str(folder / "list.csv"), str(folder / "shards"),
                           "--samples-per-shard", "250", "--workers", "1", "--no-progress"],
                          cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return folder / "shards" / "dataset.json"


def split_tensors(data: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, H, W) images and labels of one split, read with plain webdataset (the shard format:
    docs/architecture.md)."""
    meta = json.loads(data.read_text())
    urls = [str(data.parent / s["name"]) for s in meta["splits"][split]["shards"]]
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "cls"))
    images = torch.stack([torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1) for img, _ in pairs])
    return images, torch.tensor([int(c) for _, c in pairs])


def pretrain_16px(data: Path, out: Path) -> Path:
    """Pre-train a debug ViT (patch 4, 16 px: a 4 x 4 grid, tanh pre-logits head) on the `pretrain` split."""
    from data_prep.stream import normalize
    from vit import VisionTransformer, vit_config
    from vit.weights import save_weights

    images, y = split_tensors(data, "pretrain")
    small = F.interpolate(images.float(), size=16, mode="bilinear", antialias=True).round().to(torch.uint8)
    x = normalize(small, dtype=torch.float32)  # (N, 3, 16, 16), as the stream normalises
    torch.manual_seed(0)
    cfg = vit_config("debug", patch_size=4, image_size=16, representation_size=32, num_classes=10)
    model = VisionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.03)
    for _ in range(30):
        for i in range(0, len(y), 32):
            loss = F.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return save_weights(out, model.state_dict(), cfg, class_names=[str(c) for c in range(10)], step=30 * 29)


def cli_env() -> dict:
    """The environment of a CLI a test starts: one OpenMP thread, this checkout importable."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
