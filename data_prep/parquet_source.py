"""List Hugging Face `datasets` parquet files: an image column (a struct with `bytes`, or raw bytes) and a label
column (integers named by the dataset's `ClassLabel` feature when its metadata has one, or strings).

Read with pyarrow one row group at a time (memory: one row group), one file per worker; each row is located
by (file, row group, row in the group), and the writer reads back only the row groups it needs.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_prep.sources import Listing, SourceError, sort_classes
from data_prep.units import new_rows, pack, run_units, unit_fingerprint

IMAGE_COLUMN, LABEL_COLUMN = "image", "label"


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pyarrow is a dependency; say what to do if an install lacks it
        raise SourceError("reading parquet needs pyarrow: pip install pyarrow") from None
    return pq


_OPEN: dict[str, object] = {}


def open_parquet(path: str):
    """A `pyarrow.parquet.ParquetFile`, kept open per process (the writer reads many row groups of one file)."""
    if path not in _OPEN:
        _OPEN.clear()
        _OPEN[path] = _pq().ParquetFile(path)
    return _OPEN[path]


def image_bytes(value) -> bytes | None:
    """The encoded image of one cell: a `{"bytes": ..., "path": ...}` struct or raw bytes."""
    if isinstance(value, dict):
        value = value.get("bytes")
    return value if isinstance(value, (bytes, bytearray)) and value else None


def parquet_files(spec: str) -> list[str]:
    """A `.parquet` file, a folder (every `.parquet` under it) or a glob, sorted."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(str(f.resolve()) for f in p.rglob("*.parquet"))
    elif p.is_file():
        files = [str(p.resolve())]
    else:
        files = sorted(str(Path(f).resolve()) for f in glob.glob(spec))
    if not files:
        raise SourceError(f"no .parquet file matches {spec}: give a file, a folder or a glob (data/train-*.parquet)")
    return files


def class_names(schema, label_column: str) -> list[str] | None:
    """The `ClassLabel` names of `label_column` from a `datasets` parquet file's metadata, if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        info = json.loads(meta)
        features = info.get("info", {}).get("features") or info.get("features") or {}
        names = features.get(label_column, {}).get("names")
    except (ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def list_parquet_file(args: tuple[str, str, str, str]) -> dict:
    """Worker: one parquet file -> a row per image (hashed), label as text (the integer if it is one)."""
    import hashlib

    path, image_column, label_column, base = args
    pf = open_parquet(path)
    columns = pf.schema_arrow.names
    for col, flag in ((image_column, "--image-column"), (label_column, "--label-column")):
        if col not in columns:
            raise SourceError(f"{path} has no column {col!r} (columns: {', '.join(columns)}): pass {flag} NAME")
    rows, rejects = new_rows(), []
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=[image_column, label_column])
        for r, (img, label) in enumerate(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)):
            data = image_bytes(img) or b""
            name = f"{base}#{g}:{r}"
            rows["name"].append(name)
            rows["offset"].append(g << 32 | r)  # (row group, row): where the writer finds it again
            rows["size"].append(len(data))
            rows["sha"].append(hashlib.sha256(data).digest())
            rows["status"].append(0 if data else 2)
            rows["label"].append("" if label is None else str(label))
            if label is None:
                rejects.append({"path": name, "reason": "unlabeled", "detail": f"{label_column} is null"})
    return pack(rows, rejects)


def list_parquet(spec: str, image_column: str | None = None, label_column: str | None = None, imap: Callable = map,
                 cache_dir: Path | None = None, nodes: tuple[int, int] = (0, 1)) -> Listing:
    """Every row of the parquet files of `spec`, in (class, file, row) order; one file per worker."""
    from data_prep.archives import _assemble

    image_column, label_column = image_column or IMAGE_COLUMN, label_column or LABEL_COLUMN
    files = parquet_files(spec)
    root = Path(os.path.commonpath(files)) if len(files) > 1 else Path(files[0]).parent
    rel = [os.path.relpath(f, root) for f in files]
    tasks = [(f, image_column, label_column, r) for f, r in zip(files, rel, strict=True)]
    results = run_units(list_parquet_file, tasks, [unit_fingerprint(f, image_column, label_column) for f in files],
                        [os.path.getsize(f) for f in files], cache_dir, imap, *nodes)
    names = class_names(open_parquet(files[0]).schema_arrow, label_column)
    labels = [str(x) for r in results for x in r["label"]]
    rejects = []
    if names is not None:  # the dataset's own label space and order: class i stays class i
        ok = [x.lstrip("-").isdigit() and 0 <= int(x) < len(names) for x in labels]
        rejects = [{"path": str(n), "reason": "unlabeled", "detail": f"label {x} is not a class of {len(names)}"}
                   for n, x, good in zip((n for r in results for n in r["name"]), labels, ok, strict=True)
                   if x and not good]
        labels = [names[int(x)] if good else "" for x, good in zip(labels, ok, strict=True)]
        classes = names
    else:
        classes = sort_classes(x for x in labels if x)
    listing = _assemble(spec, results, rejects, labels, classes, kind="parquet")
    listing.root, listing.files, listing.column = root, files, image_column
    by_name = {r: k for k, r in enumerate(rel)}
    listing.file_id = np.array([by_name[p.rsplit("#", 1)[0]] for p in listing.paths], np.int32)
    return listing
