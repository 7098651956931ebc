"""The data section of a training config: what the stream reads and how (see docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data_prep.images import MIN_SIZE


@dataclass
class DataCfg:
    path: str = ""  # a dataset.json (or its folder), a brace pattern or URL list of tar shards
    train_split: str = "train"  # the split trained on (a key of dataset.json's splits)
    val_split: str | None = "val"  # None: no evaluation
    num_classes: int | None = None  # None: from dataset.json's class list (required for URL sources)
    workers: int = 8  # DataLoader worker processes per rank
    resampled: bool = False  # draw shards with replacement (needed when shards < ranks x workers)
    samples_per_epoch: int | None = None  # required when path is not a dataset.json
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.5  # horizontal-flip probability (0 for data where left/right matters, e.g. digits)
    crop_pct: float = 0.875  # eval: resize to size / crop_pct, centre crop
    randaugment: str | None = None  # e.g. "rand-m9-n2"
    decode: Literal["cpu", "gpu"] = "cpu"  # where JPEGs are decoded: loader workers (cpu) or the GPU, batched
    shard_root: str | None = None  # where remote shards live, e.g. "pipe:curl -s https://host/ds/{name}"
    shuffle_buffer: int = 500  # samples held for the within-shard shuffle
    prefetch: int = 2  # batches each worker prepares ahead
    timeout_s: float = 600.0  # seconds a batch may take before the loader fails
    min_size: int = MIN_SIZE  # images whose shorter side is under this many pixels are skipped (too_small)
