"""The data section of both stages' configs: what `data_prep.stream.build_loader` reads from a recipe.

Both trainers embed `DataCfg` as their `data:` section, so a recipe key means the same in pre-training and
fine-tuning; `scripts/config_docs.py` documents each field from the comment on its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

from data_prep.images import MIN_SIZE

DEFAULT_INTERPOLATION = "bilinear"  # data.interpolation=null without an init that records one (PIL's)

__all__ = ["DEFAULT_INTERPOLATION", "DataCfg", "data_problems", "names_tar_urls", "randaugment_spec",
           "url_source_problems"]


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
    mean: tuple[float, float, float] | None = None  # input = (pixel/255 - mean) / std; None: the init's or ImageNet's
    std: tuple[float, float, float] | None = None  # per-channel, > 0; None: as mean (a Hub or big_vision ViT: 0.5)
    interpolation: Literal["bilinear", "bicubic"] | None = None  # PIL's resize filter; null: the init's, else bilinear
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


def randaugment_spec(spec: str) -> tuple[int, int]:
    """(magnitude, ops) of timm's RandAugment notation, `"rand-m9-n2"` (magnitude 0-10, defaults m9, n2);
    ValueError naming the notation otherwise."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment {spec!r}: expected 'rand-m<magnitude 0-10>[-n<ops>]', e.g. 'rand-m9-n2'")
    values = {"m": 9, "n": 2}
    for part in parts[1:]:
        m = re.fullmatch(r"([mn])(\d+)", part)
        if not m:
            raise ValueError(f"randaugment {spec!r}: unknown part {part!r}; supported: m<0-10>, n<ops>")
        values[m.group(1)] = int(m.group(2))
    if not 0 <= values["m"] <= 10:
        raise ValueError(f"randaugment {spec!r}: magnitude must be within 0..10")
    return values["m"], values["n"]


def data_problems(data: DataCfg, prefix: str = "data.") -> list[str]:
    """The values of a data section no loader can use (one line each, with the range): checked before a run or
    an eval starts, rather than failing in a loader worker, or silently (a crop_pct of 2 or a flip probability
    of 3 would train and evaluate on something else than asked). The source itself is plan_loader's check."""
    problems = [f"{prefix}{key} must be >= {lo}, got {value}" for key, value, lo in (
        ("workers", data.workers, 0), ("shuffle_buffer", data.shuffle_buffer, 1), ("prefetch", data.prefetch, 1),
        ("min_size", data.min_size, 0)) if value < lo]
    lo, hi = data.scale
    if not 0 < lo <= hi <= 1:
        problems.append(f"{prefix}scale must be [min, max] area fractions with 0 < min <= max <= 1, got "
                        f"[{lo}, {hi}]")
    lo, hi = data.ratio
    if not 0 < lo <= hi:
        problems.append(f"{prefix}ratio must be [min, max] aspect ratios with 0 < min <= max, got [{lo}, {hi}]")
    if not 0 <= data.hflip <= 1:
        problems.append(f"{prefix}hflip is a probability, in [0, 1]; got {data.hflip}")
    if not 0 < data.crop_pct <= 1:
        problems.append(f"{prefix}crop_pct must be in (0, 1] (the centre crop's share of the resized image, e.g. "
                        f"0.875), got {data.crop_pct}")
    if data.std is not None and min(data.std) <= 0:
        problems.append(f"{prefix}std must be > 0 per channel (inputs are divided by it), got {list(data.std)}")
    if data.timeout_s <= 0:
        problems.append(f"{prefix}timeout_s must be > 0 seconds, got {data.timeout_s}")
    if data.randaugment:
        try:
            randaugment_spec(data.randaugment)
        except ValueError as err:
            problems.append(f"{prefix}{err}")
    return problems
