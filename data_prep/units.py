"""Listing by units (an inner tar, a shard, a parquet file): each unit is listed and hashed by one worker,
the result cached under `OUT/.parts/list/`, so a rerun after a crash lists nothing again and the nodes of a
multi-node write share the work (each lists its own units first, then takes the others' from the cache, or
lists what is still missing, so no node ever waits on another).

A unit's result is a dict of arrays, one row per member: `name` (str), `offset`, `size` (int64), `sha`
((n, 32) uint8), `status` (uint8, plan.OK | EMPTY), `label` (str, may be empty), plus `rejects`, a JSON list.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from runtime.io import atomic_write

FIELDS = ("name", "offset", "size", "sha", "status", "label")
READ_CHUNK = 1 << 20  # members are hashed 1 MB at a time: memory stays bounded whatever their size


def new_rows() -> dict[str, list]:
    return {k: [] for k in FIELDS}


def add_row(rows: dict, name: str, offset: int, size: int, fileobj, label: str = "", copy_to=None) -> None:
    """Hash `size` bytes from `fileobj` (a member's data) and append the member's row; with `copy_to` (a spool
    file) also copy the bytes there, and the row's offset is where they start in it."""
    h, left = hashlib.sha256(), size
    if copy_to is not None:
        offset = copy_to.tell()
    while left > 0:
        b = fileobj.read(min(READ_CHUNK, left))
        if not b:
            break
        h.update(b)
        if copy_to is not None:
            copy_to.write(b)
        left -= len(b)
    rows["name"].append(name)
    rows["offset"].append(offset)
    rows["size"].append(size - left)
    rows["sha"].append(h.digest())
    rows["status"].append(0 if size - left > 0 else 2)  # plan.OK, plan.EMPTY
    rows["label"].append(label)


def pack(rows: dict, rejects: list[dict]) -> dict:
    """Rows (lists) -> arrays, the unit result."""
    n = len(rows["name"])
    return {"name": np.array(rows["name"], dtype=str) if n else np.zeros(0, "<U1"),
            "offset": np.array(rows["offset"], np.int64), "size": np.array(rows["size"], np.int64),
            "sha": np.frombuffer(b"".join(rows["sha"]), np.uint8).reshape(n, 32),
            "status": np.array(rows["status"], np.uint8),
            "label": np.array(rows["label"], dtype=str) if n else np.zeros(0, "<U1"),
            "rejects": json.dumps(rejects)}


def unit_fingerprint(path: str | Path, *parts: object) -> str:
    """A unit's cache key: the archive's path, size and mtime, and whatever else decides the result."""
    st = Path(path).stat()
    return hashlib.sha256(json.dumps([str(path), st.st_size, st.st_mtime_ns, *map(str, parts)]).encode()).hexdigest()


def _load(path: Path, fp: str) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fp"]) != fp:
                return None
            return {k: (str(z[k]) if k == "rejects" else z[k]) for k in (*FIELDS, "rejects")}
    except (OSError, ValueError, KeyError):
        return None  # missing or half-written by a killed run: list again


def _save(path: Path, fp: str, result: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, fp=np.array(fp), **{k: np.array(v) if k == "rejects" else v for k, v in result.items()})
    atomic_write(path, buf.getvalue())


def node_of_units(sizes: Sequence[int], num_nodes: int) -> list[int]:
    """Each unit's node: largest first, to the node with the fewest bytes so far (ties: the lower rank), so
    every node lists about the same number of bytes; a function of the sizes only, so every node agrees."""
    load, node = [0] * num_nodes, [0] * len(sizes)
    for u in sorted(range(len(sizes)), key=lambda u: (-sizes[u], u)):
        node[u] = min(range(num_nodes), key=lambda k: (load[k], k))
        load[node[u]] += sizes[u]
    return node


def run_units(fn: Callable, tasks: Sequence[tuple], fps: Sequence[str], sizes: Sequence[int], cache_dir: Path | None,
              imap: Callable = map, node_rank: int = 0, num_nodes: int = 1) -> list[dict]:
    """`fn(task)` for every unit, results in `tasks` order. The largest units go first (a plan balanced by size:
    no worker is left with a big unit at the end); cached results are reused and new ones cached."""
    results: list[dict | None] = [None] * len(tasks)
    mine = [u for u, node in enumerate(node_of_units(sizes, num_nodes)) if node == node_rank]
    for wave in (mine, range(len(tasks))):  # own units first, then whatever no other node has cached yet
        todo = []
        for u in wave:
            if results[u] is not None:
                continue
            cached = _load(cache_dir / f"unit-{u:08d}.npz", fps[u]) if cache_dir else None
            if cached is not None:
                results[u] = cached
            else:
                todo.append(u)
        todo.sort(key=lambda u: -sizes[u])
        for u, result in zip(todo, imap(fn, [tasks[u] for u in todo]), strict=True):
            if cache_dir:
                _save(cache_dir / f"unit-{u:08d}.npz", fps[u], result)
            results[u] = result
    return results  # type: ignore[return-value]
