"""From a listing to a shard plan: content index, duplicates, splits, seeded shuffle, shard cuts.

The plan is a pure function of (listing, file contents, options): it never depends on the number of
workers or nodes, which is why every worker count and every node split writes the same shards.

The content index (sha256 and size of every file) is built by workers in fixed chunks and cached under
`OUT/.parts/index/`, so a rerun after a crash does not hash again and nodes share each other's work:
each node hashes its own chunks first, then takes the others' from the cache (or hashes what is
still missing, so no node ever waits on another).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.sources import Listing, sort_splits
from runtime.io import atomic_write

OK, UNREADABLE, EMPTY = 0, 1, 2
STATUS_REASON = {UNREADABLE: "unreadable", EMPTY: "empty"}
CHUNK_MAX = 16384
SAMPLE_OVERHEAD = 3 * 512 + 512 + 512 + 511  # per sample: 3 tar headers, .cls and .json blocks, image padding
TAR_TAIL = 10240  # end-of-archive blocks and padding to a whole tar record, at most


@dataclass
class Index:
    """Per entry: sha256 digest, size in bytes, read status; details of the failed reads."""

    sha: np.ndarray  # (N, 32) uint8
    size: np.ndarray  # (N,) int64
    status: np.ndarray  # (N,) uint8: OK | UNREADABLE | EMPTY
    detail: dict[int, str] = field(default_factory=dict)


@dataclass
class Shard:
    name: str  # {split}-{index:06d}.tar
    split: str
    entries: np.ndarray  # listing indices, in shard order


@dataclass
class Plan:
    classes: list[str]
    shards: list[Shard]  # every split's shards, splits in order
    rejects: list[dict]  # found before writing: unreadable, empty, duplicate, excluded
    fingerprint: str
    label_map: np.ndarray | None = None  # listing class index -> plan class index (-1: dropped by --min-per-class)
    dropped: dict[str, int] = field(default_factory=dict)  # class name -> its usable images, under --min-per-class

    def split_names(self) -> list[str]:
        return list(dict.fromkeys(s.split for s in self.shards))

    def node_share(self, node_rank: int, num_nodes: int) -> list[Shard]:
        """A deterministic, disjoint share: every num_nodes-th shard of the global list."""
        return self.shards[node_rank::num_nodes]


def hash_chunk(args: tuple[str, list[str]]) -> tuple[bytes, bytes, bytes, dict[int, str]]:
    """Worker: sha256/size/status of each file of one chunk (packed as bytes to pickle cheaply)."""
    root, paths = args
    sha = np.zeros((len(paths), 32), np.uint8)
    size = np.zeros(len(paths), np.int64)
    status = np.zeros(len(paths), np.uint8)
    detail = {}
    for i, rel in enumerate(paths):
        try:
            with open(os.path.join(root, rel), "rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
                size[i] = f.tell()
        except OSError as e:
            status[i], detail[i] = UNREADABLE, e.strerror or str(e)
            continue
        if size[i] == 0:
            status[i], detail[i] = EMPTY, "zero bytes"
        sha[i] = np.frombuffer(digest, np.uint8)
    return sha.tobytes(), size.tobytes(), status.tobytes(), detail


def chunk_bounds(n: int) -> list[tuple[int, int]]:
    """Fixed chunks of the listing (a function of n only, so every node and rerun agrees)."""
    size = min(CHUNK_MAX, max(256, -(-n // 64)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _chunk_fp(listing: Listing, a: int, b: int) -> np.ndarray:
    h = hashlib.sha256(str(listing.root).encode())
    h.update("\n".join(listing.paths[a:b]).encode())
    return np.frombuffer(h.digest(), np.uint8)


def _load_chunk(path: Path, fp: np.ndarray):
    try:
        with np.load(path, allow_pickle=False) as z:
            if not np.array_equal(z["fp"], fp):
                return None
            detail = {int(i): str(t) for i, t in zip(z["det_idx"], z["det_txt"], strict=True)}
            return z["sha"].tobytes(), z["size"].tobytes(), z["status"].tobytes(), detail
    except (OSError, ValueError, KeyError):
        return None  # missing or half-written by a killed run: hash again


def _save_chunk(path: Path, fp: np.ndarray, result) -> None:
    sha, size, status, detail = result
    buf = io.BytesIO()
    np.savez(buf, fp=fp, sha=np.frombuffer(sha, np.uint8), size=np.frombuffer(size, np.int64),
             status=np.frombuffer(status, np.uint8), det_idx=np.array(list(detail), np.int64),
             det_txt=np.array(list(detail.values()), dtype=str) if detail else np.zeros(0, "<U1"))
    atomic_write(path, buf.getvalue())


def build_index(listing: Listing, cache_dir: Path, imap: Callable = map, node_rank: int = 0, num_nodes: int = 1,
                on_chunk: Callable[[int], None] = lambda n: None) -> Index:
    """Hash every file (in workers via `imap`), reusing and filling the per-chunk cache."""
    n = len(listing)
    index = Index(np.zeros((n, 32), np.uint8), np.zeros(n, np.int64), np.zeros(n, np.uint8))
    bounds = chunk_bounds(n)
    fps = [_chunk_fp(listing, a, b) for a, b in bounds]
    done = [False] * len(bounds)
    mine = [c for c in range(len(bounds)) if c % num_nodes == node_rank]
    for wave in (mine, range(len(bounds))):  # own chunks first, then whatever no other node has cached yet
        todo = []
        for c in wave:
            if done[c]:
                continue
            cached = _load_chunk(cache_dir / f"index-{bounds[c][0]:010d}.npz", fps[c])
            if cached is not None:
                _fill(index, bounds[c][0], cached)
                done[c] = True
                on_chunk(bounds[c][1] - bounds[c][0])
            else:
                todo.append(c)
        args = [(str(listing.root), listing.paths[bounds[c][0]:bounds[c][1]]) for c in todo]
        for c, result in zip(todo, imap(hash_chunk, args), strict=True):
            _save_chunk(cache_dir / f"index-{bounds[c][0]:010d}.npz", fps[c], result)
            _fill(index, bounds[c][0], result)
            done[c] = True
            on_chunk(bounds[c][1] - bounds[c][0])
    return index


def _fill(index: Index, start: int, result) -> None:
    sha, size, status, detail = result
    k = len(size) // 8
    index.sha[start:start + k] = np.frombuffer(sha, np.uint8).reshape(k, 32)
    index.size[start:start + k] = np.frombuffer(size, np.int64)
    index.status[start:start + k] = np.frombuffer(status, np.uint8)
    index.detail.update({start + i: t for i, t in detail.items()})


def screen(listing: Listing, index: Index, dedup: bool, exclude: set[bytes]) -> tuple[np.ndarray, list[dict]]:
    """Usable mask and the rejects found from contents alone: unreadable, empty, excluded, duplicate.

    A duplicate is any later copy (in listing order) of bytes seen earlier; the first copy is kept.
    """
    usable = index.status == OK
    rejects = [{"path": listing.paths[i], "reason": STATUS_REASON[int(index.status[i])],
                "detail": index.detail.get(int(i), "")} for i in np.flatnonzero(~usable)]
    if exclude:
        hit = np.array([usable[i] and index.sha[i].tobytes() in exclude for i in range(len(listing))], bool)
        rejects += [{"path": listing.paths[i], "reason": "excluded", "detail": "sha256 is in --exclude-hashes"}
                    for i in np.flatnonzero(hit)]
        usable &= ~hit
    if dedup:
        ok = np.flatnonzero(usable)
        keys = np.ascontiguousarray(index.sha[ok]).view(np.dtype((np.void, 32))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        kept = ok[first[inverse.ravel()]]
        dup = ok[kept != ok]
        rejects += [{"path": listing.paths[i], "reason": "duplicate", "detail": f"same bytes as {listing.paths[k]}"}
                    for i, k in zip(dup, kept[kept != ok], strict=True)]
        usable[dup] = False
    return usable, rejects


def assign_splits(listing: Listing, usable: np.ndarray, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Split name -> listing indices (canonical order): the list's split column, or a class-stratified
    hold-out of round(val_fraction * n) of each class's n images (never a class's last training image)."""
    idx = np.flatnonzero(usable)
    if listing.split_ids is not None:
        sid = listing.split_ids[idx]
        return {s: idx[sid == k] for k, s in enumerate(listing.split_names) if np.any(sid == k)}
    if not val_fraction:
        return {"train": idx}
    rng = np.random.default_rng([seed, 1])
    by_class = idx[np.argsort(listing.labels[idx], kind="stable")]
    counts = np.bincount(listing.labels[idx], minlength=len(listing.classes))
    val = []
    for group in np.split(by_class, np.cumsum(counts)[:-1]):
        n = len(group)
        k = min(max(n - 1, 0), round(val_fraction * n))
        val.append(rng.permutation(group)[:k])
    is_val = np.zeros(len(listing), bool)
    is_val[np.concatenate(val) if val else []] = True
    splits = {"train": idx[~is_val[idx]], "val": idx[is_val[idx]]}
    return {s: v for s, v in splits.items() if len(v)}


def cut_shards(order: np.ndarray, est_bytes: np.ndarray | None, per_shard: int, max_bytes: int | None) -> list:
    """Consecutive runs of `order`: at most `per_shard` samples and (estimated) `max_bytes` bytes each.

    The estimate is tight for passed-through images (their size is known) and an upper bound for shrunk
    ones unless re-encoding at a higher quality than the source's makes them larger.
    """
    if not max_bytes:
        return [order[a:a + per_shard] for a in range(0, len(order), per_shard)]
    max_bytes -= TAR_TAIL
    shards, start, total = [], 0, 0
    for j, b in enumerate(est_bytes[order].tolist()):
        if j > start and (j - start >= per_shard or total + b > max_bytes):
            shards.append(order[start:j])
            start, total = j, 0
        total += b
    shards.append(order[start:])
    return [s for s in shards if len(s)]


def drop_rare_classes(listing: Listing, usable: np.ndarray, min_per_class: int) -> tuple[list[str], np.ndarray, dict]:
    """(kept class names, old -> new class index or -1, dropped name -> count): classes with fewer than
    `min_per_class` usable images leave the dataset and the rest are numbered again, in order (ImageNet-21K-P)."""
    counts = np.bincount(listing.labels[usable], minlength=len(listing.classes))
    keep = counts >= min_per_class
    label_map = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
    dropped = {c: int(n) for c, n, k in zip(listing.classes, counts.tolist(), keep.tolist(), strict=True) if not k}
    return [c for c, k in zip(listing.classes, keep.tolist(), strict=True) if k], label_map, dropped


def make_plan(listing: Listing, index: Index | None, options: dict) -> Plan:
    """The whole dataset's shards from a listing, its content index (or None) and the write options."""
    usable, rejects = np.ones(len(listing), bool), list(listing.rejects)
    if index is not None:
        usable, found = screen(listing, index, options["dedup"], options.get("_exclude") or set())
        rejects += found
    classes, label_map, dropped = listing.classes, np.arange(len(listing.classes)), {}
    if options.get("min_per_class"):
        classes, label_map, dropped = drop_rare_classes(listing, usable, options["min_per_class"])
        usable &= label_map[listing.labels] >= 0
    splits = assign_splits(listing, usable, options["val_fraction"], options["seed"])
    est = index.size + SAMPLE_OVERHEAD if index is not None else None
    shards = []
    for split in sort_splits(splits):
        rng = np.random.default_rng([options["seed"], 2, zlib.crc32(split.encode())])
        order = rng.permutation(splits[split])  # the seeded global shuffle: every shard mixes classes
        for k, entries in enumerate(cut_shards(order, est, options["samples_per_shard"], options["max_shard_bytes"])):
            shards.append(Shard(f"{split}-{k:06d}.tar", split, entries))
    return Plan(classes, shards, rejects, fingerprint(listing, index, options), label_map, dropped)


def fingerprint(listing: Listing, index: Index | None, options: dict) -> str:
    """Digest of everything the shards depend on: a rerun must match it to reuse finished shards."""
    h = hashlib.sha256(json.dumps({k: v for k, v in options.items() if not k.startswith("_")},
                                  sort_keys=True).encode())
    h.update(str(listing.root).encode())
    for a in range(0, len(listing), CHUNK_MAX):
        h.update("\n".join(listing.paths[a:a + CHUNK_MAX]).encode())
    h.update(listing.labels.tobytes())
    h.update("\n".join(listing.classes).encode())
    if listing.split_ids is not None:
        h.update(listing.split_ids.tobytes() + "\n".join(listing.split_names).encode())
    if index is not None:
        h.update(index.sha.tobytes() + index.status.tobytes())
    h.update(b"".join(sorted(options.get("_exclude") or ())))
    return h.hexdigest()
