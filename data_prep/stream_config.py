"""The data section of both stages' configs: what `data_prep.stream.build_loader` reads from a recipe.

Both trainers embed `DataCfg` as their `data:` section, so a recipe key means the same in pre-training and
fine-tuning; `scripts/config_docs.py` documents each field from the comment on its line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

from data_prep.images import MIN_SIZE

__all__ = ["DataCfg", "names_tar_urls", "url_source_problems"]


@dataclass
class DataCfg:
    path: str = ""  # a dataset.json (or its folder), or tar URLs (then num_classes, samples_per_epoch, val_split=null)
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


def names_tar_urls(path: str) -> bool:
    """True when `path` names tar shards directly (a brace pattern, a `::` list, `pipe:` or scheme URLs, a .tar)
    rather than a dataset.json or its folder: no per-shard sample counts and no class list come with it."""
    if path.startswith("pipe:") or "://" in path or "{" in path or "::" in path:
        return True
    return PurePath(path).suffix in (".tar", ".tgz") or path.endswith(".tar.gz")


def url_source_problems(data: DataCfg, prefix: str = "data.") -> list[str]:
    """What a `data.path` of tar URLs needs that a dataset.json would have given, all in one line with example
    values ([] when nothing is missing), so a recipe is fixed in one go rather than one traceback per key."""
    if not names_tar_urls(data.path):
        return []
    missing = []
    if data.num_classes is None:
        missing.append(f"{prefix}num_classes=1000 (the label count; no class list to read it from)")
    if data.samples_per_epoch is None:
        missing.append(f"{prefix}samples_per_epoch=1281167 (the samples in these shards; an epoch's length)")
    if data.val_split is not None:
        missing.append(f"{prefix}val_split=null (an exact eval pass needs per-shard counts: for evaluation point "
                       f"{prefix}path at the dataset.json and {prefix}shard_root at the URLs instead)")
    if not missing:
        return []
    return [f"{prefix}path {data.path} names tar shards without a dataset.json, so also set: " + "; ".join(missing)]
