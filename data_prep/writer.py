"""`write_shards`: a source -> WebDataset tar shards + dataset.json (format: docs/formats.md).

The parent lists the source and plans; worker processes do every per-file step (hash, decode, resize,
encode) and each writes whole shards, so the bytes never depend on `workers`. A shard is written as
`name.tar.tmp`, its receipt is saved, then it is renamed: a rerun after a crash or `kill -9` keeps the
finished shards (receipt and size match the plan) and rewrites the rest, byte for byte.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from webdataset import TarWriter

from data_prep.images import MIN_SIZE, Encoded, ImageOptions, Reject, encode_image
from data_prep.lists import load_class_names, load_exclude_hashes
from data_prep.manifest import (
    ManifestError,
    claim_output,
    finalize,
    load_json,
    load_receipt,
    parts_dir,
    receipt_path,
    size_bin,
    summary_table,
)
from data_prep.near import NEAR_THRESHOLD, cached_index, downstream_index
from data_prep.plan import Plan, build_index, make_plan
from data_prep.pool import worker_pool
from data_prep.readers import read_locs
from data_prep.sources import Listing, first_missing, list_source, no_output_if_unusable
from runtime.io import atomic_write_json
from runtime.progress import progress_bar

TAR_MTIME = 0  # fixed member times: reruns are byte-identical
NEAR_BATCH = 64  # images encoded before one --exclude-near lookup: bounded memory, numpy overhead amortised


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs besides the shard's own items."""

    root: str
    out: str
    opts: ImageOptions
    kind: str = "file"  # where the bytes are: readers.read_locs
    column: str = ""  # parquet: the image column
    near: str = ""  # the downstream pHash index (.npz) of --exclude-near, if any


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)


def _stats_add(stats: dict, w: int, h: int, nbytes: int) -> None:
    if not stats:
        stats.update(n=0, width_min=w, width_max=w, height_min=h, height_max=h, width_sum=0, height_sum=0,
                     image_bytes=0, shorter_side=Counter())
    stats["n"] += 1
    stats["width_sum"] += w
    stats["height_sum"] += h
    stats["image_bytes"] += nbytes
    stats["width_min"], stats["width_max"] = min(stats["width_min"], w), max(stats["width_max"], w)
    stats["height_min"], stats["height_max"] = min(stats["height_min"], h), max(stats["height_max"], h)
    stats["shorter_side"][size_bin(min(w, h))] += 1


def _checked(data: bytes | Reject, want_sha: str) -> tuple[bytes, str]:
    if isinstance(data, Reject):
        raise data
    sha = hashlib.sha256(data).hexdigest()
    if want_sha and sha != want_sha:
        raise Reject("changed", "file changed after it was indexed; rerun to index it again")
    return data, sha


def _encoded(job: ShardJob, items: list) -> Iterator[tuple[tuple, Encoded | Reject, bytes, str]]:
    """(item, encoded image or its Reject, source bytes, source sha256) in item order. With --exclude-near the
    images are checked against the downstream index NEAR_BATCH at a time (one vectorised lookup per batch)."""
    datas = read_locs(job.kind, job.root, [it[2] for it in items], job.column)
    batch: list = []
    for item, raw in zip(items, datas, strict=True):
        data, sha = b"", ""
        try:
            data, sha = _checked(raw, item[5])
            batch.append((item, encode_image(data, job.opts, want_hash=bool(job.near)), data, sha))
        except Reject as r:
            batch.append((item, r, data, sha))
        if len(batch) >= NEAR_BATCH:
            yield from _near_check(job, batch)
            batch = []
    yield from _near_check(job, batch)


def _near_check(job: ShardJob, batch: list) -> list:
    """Turn images within --near-threshold bits of a downstream image into rejects naming that image."""
    if not job.near:
        return batch
    index, names = cached_index(job.near)
    todo = [k for k, b in enumerate(batch) if not isinstance(b[1], Reject)]
    for k, hit in zip(todo, index.lookup_many(np.array([batch[k][1].phash for k in todo], np.uint64)), strict=True):
        if hit is not None:
            batch[k] = (batch[k][0], Reject("near_duplicate", f"{hit[1]} bits from {names[hit[0]]} (--exclude-near)"),
                        *batch[k][2:])
    return batch


def write_shard(args: tuple[ShardJob, str, str, list, str]) -> dict:
    """Worker: write one whole shard (tmp -> receipt -> rename) and return its receipt."""
    job, name, split, items, fingerprint = args
    out = Path(job.out)
    tmp = out / f"{name}.tmp"
    try:
        return _write_tmp_then_rename(job, name, split, items, fingerprint, out, tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)  # never leave a half-written shard behind (disk full, I/O error)
        if e.filename is None:  # a failed write() names no file: name the shard for the error message
            raise OSError(e.errno, e.strerror, str(out / name)) from None
        raise


def _write_tmp_then_rename(job: ShardJob, name: str, split: str, items: list, fingerprint: str, out: Path,
                           tmp: Path) -> dict:
    rejects, labels, stats = [], Counter(), {}
    with open(tmp, "wb") as f:
        hf = _HashingWriter(f)
        with TarWriter(hf, encoder=False, compress=False, mtime=TAR_MTIME, user="vitscale", group="vitscale") as tw:
            for (key, rel, _, label, label_name, _), enc, data, src_sha in _encoded(job, items):
                if isinstance(enc, Reject):
                    rejects.append({"path": rel, "reason": enc.reason, "detail": enc.detail})
                    continue
                sha = src_sha if enc.data is data else hashlib.sha256(enc.data).hexdigest()
                meta = json.dumps({"label": label_name, "src": rel, "width": enc.width, "height": enc.height,
                                   "sha256": sha, "src_sha256": src_sha})
                tw.write({"__key__": key, enc.ext: enc.data, "cls": str(label).encode(), "json": meta.encode()})
                labels[str(label)] += 1
                _stats_add(stats, enc.width, enc.height, len(enc.data))
        f.flush()
        os.fsync(f.fileno())
    receipt = {"fingerprint": fingerprint, "name": name, "split": split, "samples": sum(labels.values()),
               "bytes": hf.bytes, "sha256": hf.sha.hexdigest(), "label_counts": dict(sorted(labels.items())),
               "image_stats": stats, "rejects": rejects, "inputs": len(items)}
    atomic_write_json(receipt_path(out, name), receipt, indent=None)
    os.replace(tmp, out / name)
    return receipt


class DiskFullError(OSError):
    """The output device filled up during a write: free space and rerun (finished shards are kept)."""


def remove_temp_files(out: Path, names: list[str] | None = None) -> None:
    """Delete temporary files that a killed or failed write left behind: every `*.tmp` under `out`, or with
    `names` only those of these shards (`name.tmp` and their receipts' atomic temps), so that a node of a
    multi-node write never touches a temp file that another node is still writing."""
    if names is None:
        paths = list(out.rglob("*.tmp"))
    else:
        receipts = receipt_path(out, "x").parent
        paths = [out / f"{n}.tmp" for n in names] + [p for n in names for p in receipts.glob(f".{n}.json.*.tmp")]
    for p in paths:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def _disk_full_is_clear(out: Path, names: list[str] | None) -> Iterator[None]:
    """A full disk (ENOSPC/EDQUOT) anywhere in the block -> temp files removed and one clear error; Ctrl-C ->
    temp files removed (the pool has stopped by then), then on its way."""
    try:
        yield
    except KeyboardInterrupt:
        remove_temp_files(out, names)
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        remove_temp_files(out, names)  # the pool stopped the other workers mid-shard
        raise DiskFullError(f"{errno.errorcode[e.errno]}: no space left on the device while writing "
                            f"{e.filename or out}: free space (or write to a bigger disk) and rerun the same "
                            "command; the finished shards are kept and the rerun resumes") from None


def resolve_nodes(num_nodes: int | None, node_rank: int | None, env=os.environ) -> tuple[int, int]:
    """(rank, count): the arguments, else a SLURM job array's task id and count, else (0, 1).

    An explicit `--num-nodes 1` opts out of the SLURM defaults (an array used for something else)."""
    from_slurm = num_nodes is None and bool(env.get("SLURM_ARRAY_TASK_COUNT"))
    if from_slurm:
        num_nodes = int(env["SLURM_ARRAY_TASK_COUNT"])
    if node_rank is None and (from_slurm or (num_nodes or 1) > 1) and env.get("SLURM_ARRAY_TASK_ID"):
        node_rank = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    num_nodes, node_rank = num_nodes or 1, node_rank or 0
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"--node-rank {node_rank} must be in [0, --num-nodes {num_nodes})")
    return node_rank, num_nodes


def _check_plan(out: Path, plan: Plan, options: dict, class_names: dict[str, str] | None = None) -> None:
    """Save the plan; refuse to mix shards of a different plan into the same folder."""
    path = parts_dir(out) / "plan.json"
    if path.exists() and load_json(path).get("fingerprint") != plan.fingerprint:
        raise ValueError(f"{out} already holds shards planned from other inputs or options; "
                         "write to an empty folder (or delete this one) to start over")
    splits: dict[str, list[str]] = {s: [] for s in plan.split_names()}
    for s in plan.shards:
        splits[s.split].append(s.name)
    atomic_write_json(path, {"fingerprint": plan.fingerprint, "classes": plan.classes, "splits": splits,
                             "shard_fingerprints": {s.name: shard_fingerprint(plan, s.name) for s in plan.shards},
                             "rejects": plan.rejects, "options": options, "dropped_classes": plan.dropped,
                             "class_names": [class_names.get(c, "") for c in plan.classes] if class_names else None},
                      indent=None)


def shard_fingerprint(plan: Plan, name: str) -> str:
    return hashlib.sha256(f"{plan.fingerprint}/{name}".encode()).hexdigest()


def spool_ready(listing: Listing) -> bool:
    """Whether a `.tar.gz` listing's spool still holds every member (a finished run deletes it; a rerun that
    finds the listing cached but the spool gone must stream the archive again)."""
    if not listing.spool:
        return True
    end = int((listing.offset + listing.size).max(initial=0))
    return os.path.exists(listing.spool) and os.path.getsize(listing.spool) >= end


def _tasks(listing: Listing, plan: Plan, index, job: ShardJob, shards) -> Iterator[tuple]:
    for s in shards:
        label = plan.label_map[listing.labels[s.entries]].tolist()
        items = [(f"{i:08d}", listing.paths[i], listing.loc(i), k, plan.classes[k],
                  index.sha[i].tobytes().hex() if index is not None else "")
                 for i, k in zip(s.entries.tolist(), label, strict=True)]
        yield job, s.name, s.split, items, shard_fingerprint(plan, s.name)


def _check_args(src, out, samples_per_shard: int, val_fraction: float, workers: int, max_shard_bytes: int | None,
                min_per_class: int, seed: int, near_threshold: int) -> None:
    bad = [f"{name} {rule}, got {value}" for name, value, ok, rule in (
        ("--seed", seed, seed >= 0, "must be >= 0"),  # numpy's generator takes no negative seed
        ("--near-threshold", near_threshold, 0 <= near_threshold <= 64, "must be in 0..64 (bits of a 64-bit pHash)"),
        ("--samples-per-shard", samples_per_shard, samples_per_shard >= 1, "must be >= 1"),
        ("--val-fraction", val_fraction, 0 <= val_fraction < 1, "must be in [0, 1)"),
        ("--workers", workers, workers >= 1, "must be >= 1"),
        ("--max-shard-bytes", max_shard_bytes, (max_shard_bytes or 1) >= 1, "must be >= 1"),
        ("--min-per-class", min_per_class, min_per_class >= 0, "must be >= 0")) if not ok]
    if bad:
        raise ValueError("; ".join(bad))
    if Path(src).is_dir() and Path(out).resolve().is_relative_to(Path(src).resolve()):
        raise ValueError(f"output folder {out} is inside the source tree {src}: its shards would be listed as "
                         "images of a class; write somewhere else")


def _near_index(exclude_near: str | None, threshold: int, out: Path, imap: Callable, options: dict) -> str:
    """--exclude-near: hash the downstream sets into OUT/.parts/near.npz (the workers' index) and record them
    in the options (the plan's fingerprint changes with them); "" when not asked for."""
    if not exclude_near:
        return ""
    path = parts_dir(out) / "near.npz"
    digest = downstream_index(exclude_near, threshold, path, imap)
    options.update(exclude_near=exclude_near, near_threshold=threshold, near_hashes_sha256=digest)
    return str(path)


def _write_todo(imap_unordered: Callable, tasks: Iterator, todo: list, spool: str, progress: bool) -> int:
    """Write the shards of `tasks` in the workers; return the inputs processed. A `.tar.gz`'s spool is deleted
    once every shard of this node is written (kept after a failure: the rerun resumes from it)."""
    processed, total = 0, sum(len(s.entries) for s in todo)
    try:
        with progress_bar(total=total, desc="write", unit="img", enabled=progress) as bar:
            for receipt in imap_unordered(write_shard, tasks):
                bar.update(receipt["inputs"])
                processed += receipt["inputs"]
    finally:
        if spool and processed == total:
            Path(spool).unlink(missing_ok=True)
    return processed


def _list_again(out: Path, relist: Callable[[], Listing]) -> Listing:
    """A listing an earlier run made whose spool is gone: its cached units are dropped and the source streamed
    again."""
    for p in (parts_dir(out) / "list").glob("unit-*.npz"):
        p.unlink()
    return relist()


def _node_report(out: Path, node_rank: int, num_nodes: int, mine: list[str], written: int,
                 log: Callable[[str], None] | None) -> dict:
    """What one node of a multi-node write returns (the manifest waits for `merge`)."""
    if log:
        log(f"node {node_rank}/{num_nodes}: {len(mine)} shards ({written} written now); "
            f"run `python -m data_prep merge {out}` once every node is done")
    return {"node_rank": node_rank, "num_nodes": num_nodes, "shards": mine, "written": written}


def _finish(out: Path, seconds: float, processed: int, log: Callable[[str], None] | None) -> dict:
    """A single-node write's manifest, and its summary to `log`."""
    with _disk_full_is_clear(out, None):
        manifest = finalize(out)
    if log:
        log(summary_table(manifest, seconds, processed))
    return manifest


def write_shards(src: str | os.PathLike, out: str | os.PathLike, *, val_fraction: float = 0.0,
                 samples_per_shard: int = 1000, max_shard_bytes: int | None = None, seed: int = 0,
                 resize_shorter: int | None = None, resize_longer: int | None = None, format: str = "keep",
                 quality: int = 90, min_size: int = MIN_SIZE, dedup: bool = True,
                 exclude_hashes: str | os.PathLike | None = None, workers: int = 1, num_nodes: int | None = None,
                 node_rank: int | None = None, progress: bool = False, source_format: str = "auto",
                 labels: str | None = None, image_column: str | None = None, label_column: str | None = None,
                 min_per_class: int = 0, class_names: str | None = None, exclude_near: str | None = None,
                 near_threshold: int = NEAR_THRESHOLD, log: Callable[[str], None] | None = None) -> dict:
    """Write `src` (any source of `sources.list_source`) as shards into `out`; return the manifest.

    With several nodes this writes the node's share only and returns a node report
    (`{"node_rank", "num_nodes", "shards", "written"}`); `merge(out)` then writes the manifest.
    """
    t0 = time.perf_counter()
    opts = ImageOptions(resize_shorter, resize_longer, format, quality, min_size)
    _check_args(src, out, samples_per_shard, val_fraction, workers, max_shard_bytes, min_per_class, seed,
                near_threshold)
    node_rank, num_nodes = resolve_nodes(num_nodes, node_rank)
    out = Path(out)
    names = load_class_names(class_names) if class_names else None
    exclude = load_exclude_hashes(exclude_hashes) if exclude_hashes else set()
    resolved = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    options = {"source": resolved(src), "val_fraction": val_fraction, "samples_per_shard": samples_per_shard,
               "max_shard_bytes": max_shard_bytes, "seed": seed, **asdict(opts), "dedup": dedup,
               "exclude_hashes": resolved(exclude_hashes), "source_format": source_format, "labels": resolved(labels),
               "image_column": image_column, "label_column": label_column, "min_per_class": min_per_class}
    # a single-node write owns its folder; a node of several may only clean up after its own shards
    own: list[str] | None = None if num_nodes == 1 else []
    created = first_missing(out) if own is None else None  # a node never removes the folder the nodes share
    with claim_output(out, node_rank, num_nodes):  # refused if another job writes OUT: nothing of ours to undo
        with _disk_full_is_clear(out, own), worker_pool(workers) as (imap, imap_unordered):
            relist = lambda: list_source(src, map_fn=imap, source_format=source_format, labels=labels,  # noqa: E731
                                         image_column=image_column, label_column=label_column,
                                         cache_dir=parts_dir(out) / "list", nodes=(node_rank, num_nodes))
            with no_output_if_unusable(created):  # the folder is kept once the source is known good
                near = _near_index(exclude_near, near_threshold, out, imap, options)  # first: a bad set fails fast
                listing = relist()
            out.mkdir(parents=True, exist_ok=True)
            index = listing.index
            if index is None and (dedup or exclude or max_shard_bytes):  # needs every file's contents before planning
                with progress_bar(total=len(listing), desc="index", unit="file", enabled=progress) as bar:
                    index = build_index(listing, parts_dir(out) / "index", imap, node_rank, num_nodes, bar.update)
            plan = make_plan(listing, index, {**options, "_exclude": exclude})
            _check_plan(out, plan, options, names)
            job = ShardJob(str(listing.root), str(out), opts, listing.kind, listing.column, near)
            mine = plan.node_share(node_rank, num_nodes)
            todo = [s for s in mine if load_receipt(out, s.name, shard_fingerprint(plan, s.name)) is None]
            if own is not None:
                own += [s.name for s in todo]
            remove_temp_files(out, own)  # what a killed earlier run left behind
            if todo and not spool_ready(listing):
                listing = _list_again(out, relist)
            processed = _write_todo(imap_unordered, _tasks(listing, plan, index, job, todo), todo, listing.spool,
                                    progress)
        if num_nodes > 1:
            return _node_report(out, node_rank, num_nodes, [s.name for s in mine], len(todo), log)
        return _finish(out, time.perf_counter() - t0, processed, log)


__all__ = ["DiskFullError", "ManifestError", "ShardJob", "resolve_nodes", "write_shard", "write_shards"]
