"""The data section of both stages' configs: what `data_prep.stream.build_loader` reads from a recipe.

Both trainers embed `DataCfg` as their `data:` section, so a recipe key means the same in pre-training and
fine-tuning; `scripts/config_docs.py` documents each field from the comment on its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from data_prep.images import MIN_SIZE

__all__ = ["DataCfg"]


@dataclass
class DataCfg:
    path: str = ""  # a dataset.json (or its folder), or a brace pattern / list of tar URLs
    train_split: str = "train"  # the split trained on (a key of dataset.json's splits)
    val_split: str | None = "val"  # None: no evaluation
    num_classes: int | None = None  # None: from dataset.json's class list (needed for URL sources)
    workers: int = 8  # DataLoader worker processes per rank
    resampled: bool = False  # draw shards with replacement (needed when shards < ranks x workers)
    samples_per_epoch: int | None = None  # training samples per epoch; required when path is not a dataset.json
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4 / 3)  # RandomResizedCrop aspect-ratio range
    hflip: float = 0.5  # horizontal-flip probability (0 for data where left/right matters, e.g. digits)
    crop_pct: float = 0.875  # eval: resize to size / crop_pct, centre crop
    randaugment: str | None = None  # e.g. "rand-m9-n2"
    decode: Literal["cpu", "gpu"] = "cpu"  # where JPEGs are decoded: loader workers (cpu) or the GPU, batched
    shard_root: str | None = None  # where dataset.json's shards live, e.g. "pipe:curl -s https://host/ds/{name}"
    shuffle_buffer: int = 500  # samples each worker shuffles among (more: better mixing, more memory)
    prefetch: int = 2  # micro-batches each worker prepares ahead
    timeout_s: float = 600.0  # seconds a micro-batch may take before the loader fails
    min_size: int = MIN_SIZE  # images whose shorter side is under this many pixels are skipped (too_small)
