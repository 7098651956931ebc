"""Read finished shards back: `verify` (what is wrong, if anything), `stats_table` and `preview`."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageDraw

from data_prep.manifest import ManifestError, human_bytes, load_manifest, summary_table
from data_prep.pool import worker_pool
from runtime.io import atomic_path, output_problem
from runtime.progress import progress_bar

IMAGE_EXTS = ("jpg", "png", "webp")


def iter_samples(path: str | os.PathLike, unsafe: list[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of a shard, members grouped by key as webdataset does.
    Members with unsafe names (absolute, '..') are left out, and their names appended to `unsafe` if given."""
    from data_prep.stream_source import is_safe_member  # here: stream_source imports webdataset, hence torch

    key, sample = None, {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            if not is_safe_member(m.name):
                if unsafe is not None:
                    unsafe.append(m.name)
                continue
            k, _, ext = m.name.partition(".")
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(m).read()
    if sample:
        yield key, sample


def _check_sample(key: str, sample: dict[str, bytes], classes: list[str], decode: bool) -> tuple[list[str], int]:
    """Problems with one sample and its class index (-1 if unreadable)."""
    img_exts = [e for e in sample if e in IMAGE_EXTS]
    extra = sorted(set(sample) - set(IMAGE_EXTS) - {"cls", "json"})
    if len(img_exts) != 1 or "cls" not in sample or "json" not in sample or extra:
        return [f"sample {key}: members {sorted(sample)}, expected one of jpg/png/webp plus cls and json"], -1
    problems = []
    try:
        label = int(sample["cls"])
        meta = json.loads(sample["json"])
    except ValueError as e:
        return [f"sample {key}: unreadable cls/json ({e})"], -1
    if not 0 <= label < len(classes):
        return [f"sample {key}: class index {label} outside 0..{len(classes) - 1}"], -1
    if meta.get("label") != classes[label]:
        problems.append(f"sample {key}: json label {meta.get('label')!r} != classes[{label}] {classes[label]!r}")
    data = sample[img_exts[0]]
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        problems.append(f"sample {key}: image bytes do not match the json sha256")
    if decode:
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                if img.size != (meta.get("width"), meta.get("height")):
                    problems.append(f"sample {key}: image is {img.size[0]}x{img.size[1]}, json says "
                                    f"{meta.get('width')}x{meta.get('height')}")
        except Exception as e:  # any decoder failure is the finding itself
            problems.append(f"sample {key}: does not decode ({type(e).__name__}: {e})")
    return problems, label


def check_shard(args: tuple[str, dict, list[str], bool]) -> tuple[list[str], list[str], Counter]:
    """Problems in one shard, its keys, and its label counts (worker function)."""
    path, expected, classes, decode = args
    name = expected["name"]
    if not os.path.exists(path):
        return [f"{name}: missing"], [], Counter()
    problems = []
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
        size = f.tell()
    if size != expected["bytes"]:
        problems.append(f"{name}: {size} bytes, dataset.json says {expected['bytes']}")
    if sha != expected["sha256"]:
        problems.append(f"{name}: sha256 differs from dataset.json (changed or corrupt)")
    keys, counts, unsafe = [], Counter(), []
    try:
        for key, sample in iter_samples(path, unsafe):
            keys.append(key)
            sample_problems, label = _check_sample(key, sample, classes, decode)
            problems += [f"{name}: {p}" for p in sample_problems]
            counts[label] += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{name}: not a readable tar ({e})")
    problems += [f"{name}: member {m!r} has an unsafe name (absolute or '..'; never written by data_prep): the "
                 "shard was tampered with or made by another tool, rewrite it with `data_prep write`" for m in unsafe]
    if len(keys) != expected["samples"]:
        problems.append(f"{name}: {len(keys)} samples, dataset.json says {expected['samples']}")
    return problems, keys, counts


def _check_folder(out: Path, manifest: dict) -> list[str]:
    listed = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    problems = [f"{p.name}: shard file not listed in dataset.json" for p in sorted(out.glob("*.tar"))
                if p.name not in listed]
    problems += [f"{p.name}: leftover temporary file of an unfinished write" for p in sorted(out.glob("*.tar.tmp"))]
    log = out / manifest["rejects"]["log"]
    if not log.exists():
        problems.append(f"{log.name}: missing (dataset.json counts {manifest['rejects']['count']} rejects)")
    elif sum(1 for _ in open(log, encoding="utf-8")) != manifest["rejects"]["count"]:
        problems.append(f"{log.name}: line count differs from dataset.json rejects.count")
    return problems


def _check_split(split: str, info: dict, counts: Counter, label_counts: list | None, n_classes: int) -> list[str]:
    problems = []
    if sum(s["samples"] for s in info["shards"]) != info["samples"]:
        problems.append(f"split {split}: shard sample counts do not add up to {info['samples']}")
    if [counts.get(c, 0) for c in range(n_classes)] != label_counts:
        problems.append(f"split {split}: label counts in the shards differ from dataset.json label_counts")
    return problems


def verify(out: str | os.PathLike, decode: bool = False, workers: int = 1, progress: bool = False) -> list[str]:
    """Everything wrong with a shard folder (empty list = all good): file sha256/bytes, sample counts,
    members, labels, per-sample hashes, unique keys, label counts, and with `decode` every image.
    `progress`: a bar in images (runtime.progress: rank 0's terminal only)."""
    out = Path(out)
    try:
        manifest = load_manifest(out)
    except ManifestError as e:  # missing, unreadable, or not the contract's format: the one problem found
        return [str(e)]
    problems, seen = _check_folder(out, manifest), Counter()
    classes = manifest["classes"]
    total = sum(s["samples"] for info in manifest["splits"].values() for s in info["shards"])
    with worker_pool(workers) as (imap, _), progress_bar(total=total, desc="verify", unit="img",
                                                         enabled=progress) as bar:
        for split, info in manifest["splits"].items():
            tasks = [(str(out / s["name"]), s, classes, decode) for s in info["shards"]]
            counts = Counter()
            for (_, shard, *_), (shard_problems, keys, shard_counts) in zip(tasks, imap(check_shard, tasks),
                                                                             strict=True):
                bar.update(shard["samples"])
                problems += shard_problems
                seen.update(keys)
                counts.update(shard_counts)
            problems += _check_split(split, info, counts, manifest["label_counts"].get(split), len(classes))
    dups = [k for k, n in seen.items() if n > 1]
    if dups:
        problems.append(f"{len(dups)} keys occur more than once (e.g. {', '.join(sorted(dups)[:3])})")
    return problems


def stats_table(out: str | os.PathLike, max_classes: int = 40) -> str:
    """The manifest as text: splits, rejects, per-class counts (a histogram) and image sizes."""
    m = load_manifest(out)
    splits, classes = list(m["splits"]), m["classes"]
    rows = [summary_table(m), "", f"classes: {len(classes)}"]
    totals = [sum(m["label_counts"][s][c] for s in splits) for c in range(len(classes))]
    order = list(range(len(classes)))
    if len(classes) > max_classes:  # the most and the least frequent, max_classes rows in all
        by_count = sorted(order, key=lambda c: -totals[c])
        most, least = (max_classes + 1) // 2, max_classes // 2
        order = by_count[:most] + by_count[len(by_count) - least:]
        rows.append(f"(showing the {most} most and {least} least frequent classes)")
    width = max([len("class")] + [len(classes[c]) for c in order])
    rows.append(f"{'class':<{width}} " + " ".join(f"{s:>8}" for s in splits))
    peak = max(totals, default=0) or 1
    for c in order:
        bar = "#" * round(30 * totals[c] / peak)
        rows.append(f"{classes[c]:<{width}} " + " ".join(f"{m['label_counts'][s][c]:>8}" for s in splits) + f"  {bar}")
    for split, st in m.get("image_stats", {}).items():
        if st.get("n"):
            hist = ", ".join(f"{b}: {n}" for b, n in st["shorter_side"].items())
            rows += ["", f"images ({split}): width min/mean/max {'/'.join(map(str, st['width']))}, height "
                     f"{'/'.join(map(str, st['height']))}, {human_bytes(st['mean_bytes'])} mean",
                     f"  shorter side: {hist}"]
    return "\n".join(rows)


def preview(out: str | os.PathLike, dest: str | os.PathLike, n: int = 64, split: str = "train",
            cell: int = 96) -> Path:
    """A PNG grid of the first `n` samples of `split`, each captioned with its label."""
    if why := output_problem(dest, "--out"):
        raise ValueError(why)
    m = load_manifest(out)
    if split not in m["splits"]:
        raise ValueError(f"split {split!r} is not in {out}/dataset.json (it has {', '.join(m['splits'])})")
    tiles = []
    for shard in m["splits"][split]["shards"]:
        for _, sample in iter_samples(Path(out) / shard["name"]):
            img = Image.open(io.BytesIO(next(sample[e] for e in IMAGE_EXTS if e in sample))).convert("RGB")
            img.thumbnail((cell, cell))
            tiles.append((img, m["classes"][int(sample["cls"])]))
            if len(tiles) >= n:
                break
        if len(tiles) >= n:
            break
    if not tiles:
        raise ValueError(f"split {split!r} of {out}/dataset.json has no samples to preview (see `data_prep stats`)")
    cols = max(1, math.ceil(math.sqrt(len(tiles))))
    rows, caption = max(1, math.ceil(len(tiles) / cols)), 14
    grid = Image.new("RGB", (cols * cell, rows * (cell + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, label) in enumerate(tiles):
        x, y = (i % cols) * cell, (i // cols) * (cell + caption)
        grid.paste(img, (x + (cell - img.width) // 2, y + (cell - img.height) // 2))
        draw.text((x + 2, y + cell), label[: cell // 6], fill=(0, 0, 0))
    with atomic_path(dest) as tmp:
        grid.save(tmp, "PNG")
    return Path(dest)
