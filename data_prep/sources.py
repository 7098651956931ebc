"""List a source: an ImageFolder tree or a CSV/JSONL list of `path,label[,split]` here; tar archives
(tar-of-tars, flat tar + labels, WebDataset shards: `archives.py`) and parquet files (`parquet_source.py`)
through `list_source`, which picks the reader from what SRC is (or `source_format`).

Listing only: no file is opened, hashed or stat'ed here (that is the workers' job), so listing
ImageNet-21k's 14 M files costs one directory walk. Class folders are walked in parallel when a
`map_fn` from a process pool is given; the result is the same either way.

The listing order is canonical (classes sorted, then paths sorted within a class; a list keeps its
row order): shard plans, duplicate resolution and keys all derive from it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LIST_SUFFIXES = (".csv", ".jsonl")
FORMATS = ("auto", "folder", "list", "tar-of-tars", "tar", "parquet", "shards")
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class SourceError(ValueError):
    """The source cannot be used at all (missing, empty, or a malformed list)."""


def first_missing(path: str | os.PathLike) -> Path | None:
    """The first folder of `path` that does not exist yet (what making `path` would create), or None."""
    path = Path(path).absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


@contextlib.contextmanager
def no_output_if_unusable(created: Path | None) -> Iterator[None]:
    """Listing inside this block: a source found missing, empty or malformed (`SourceError`, or any bad input:
    a ValueError) removes `created`, the first folder of OUT that this write made (`first_missing` before it
    began: its lock, an archive's listing cache or the --exclude-near index may be in it). None: OUT was there
    already, or is shared by the nodes of a multi-node write; nothing is removed."""
    try:
        yield
    except ValueError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


@dataclass
class Listing:
    """Every candidate sample, in canonical order."""

    root: Path  # relative paths are relative to this folder
    paths: list[str]  # relative (or absolute, if the list said so) source paths
    labels: np.ndarray  # (N,) int32 class index
    classes: list[str]  # class names by index
    split_ids: np.ndarray | None = None  # (N,) int16 index into split_names, when the list has a split column
    split_names: tuple[str, ...] = ()
    # where the bytes are, for sources other than files (readers.py): archive or parquet file, offset, size
    kind: str = "file"  # file | tar | gztar | parquet
    files: list[str] = field(default_factory=list)
    file_id: np.ndarray | None = None  # (N,) int32 index into files
    offset: np.ndarray | None = None  # (N,) int64: a member's data offset; parquet: row group << 32 | row
    size: np.ndarray | None = None  # (N,) int64 bytes
    column: str = ""  # parquet: the image column
    index: object | None = None  # plan.Index when listing already hashed every entry (archives, parquet)
    rejects: list[dict] = field(default_factory=list)  # found while listing (not a tar, unlabeled, ...)
    spool: str = ""  # a .tar.gz's members, copied here by the listing pass (`files` is then [spool])

    def __len__(self) -> int:
        return len(self.paths)

    def loc(self, i: int) -> str | tuple:
        """Where entry i's bytes are, as `readers.read_locs` takes it."""
        if self.kind == "file":
            return self.paths[i]
        path, off = self.files[int(self.file_id[i])], int(self.offset[i])
        if self.kind == "parquet":
            return path, off >> 32, off & 0xFFFFFFFF
        return path, off, int(self.size[i])


def sort_classes(names: Iterable[str]) -> list[str]:
    """Class names in index order: numerically if all are integers ("2" before "10"), else by name."""
    names = sorted(set(names))
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return names


def _hidden(name: str) -> bool:
    return name.startswith(".")


def walk_class(args: tuple[str, str]) -> list[str]:
    """Sorted paths (relative to the root) of every non-hidden file under one class folder."""
    root, cls = args
    out = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        rel = os.path.relpath(dirpath, root)
        out.extend(os.path.join(rel, f) for f in filenames if not _hidden(f))
    out.sort()
    return out


def list_image_folder(root: Path, map_fn: Callable = map) -> Listing:
    """`root/<class>/.../<image>`: the class is the first folder level; files in `root` itself are ignored."""
    with os.scandir(root) as it:
        class_dirs = [e.name for e in it if e.is_dir() and not _hidden(e.name)]
    if not class_dirs:
        raise SourceError(f"{root} has no class folders: expected {root}/<class>/<image> (or give a .csv/.jsonl list)")
    files = dict(zip(class_dirs, map_fn(walk_class, [(str(root), c) for c in class_dirs]), strict=True))
    classes = sort_classes(c for c, f in files.items() if f)  # a class with no files gets no index
    if not classes:
        raise SourceError(f"{root} has class folders but no files in them: nothing to write; expected "
                          f"{root}/<class>/<image>")
    paths = [p for c in classes for p in files[c]]
    labels = np.concatenate([np.full(len(files[c]), k, np.int32) for k, c in enumerate(classes)])
    return Listing(root=root, paths=paths, labels=labels, classes=classes)


@contextlib.contextmanager
def open_text(path: str | os.PathLike, what: str = "") -> Iterator:
    """A text file the user wrote (a list, labels, class names, digests), read as UTF-8 with or without the byte
    order mark spreadsheet programs put first; bytes that are not UTF-8 are a SourceError naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            yield f
    except UnicodeDecodeError as e:
        raise SourceError(f"{what}{' ' if what else ''}{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at "
                          f"offset {e.start}); save it as UTF-8") from None


def _csv_rows(path: Path) -> Iterable[tuple[int, dict]]:
    with open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise SourceError(f"{path} is empty: expected a header line `path,label[,split]` and one row per image")
        header = [h.strip() for h in header]
        missing = {"path", "label"} - set(header)
        if missing:
            raise SourceError(f"{path}:1: header {header} lacks {sorted(missing)}; expected `path,label[,split]`")
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise SourceError(f"{path}:{reader.line_num}: {len(row)} fields, the header has {len(header)}: {row}")
            yield reader.line_num, dict(zip(header, (c.strip() for c in row), strict=True))


def _jsonl_rows(path: Path) -> Iterable[tuple[int, dict]]:
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{n}: not valid JSON ({e.msg}): {line.strip()[:80]}") from None
            if not isinstance(row, dict):
                raise SourceError(f"{path}:{n}: expected an object with path and label, got {line.strip()[:80]}")
            yield n, row


def list_file(path: Path) -> Listing:
    """A `.csv` (with a header) or `.jsonl` list; relative paths resolve against the list's folder."""
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    paths, names, splits, lines = [], [], [], []
    for n, row in rows:
        p, label, split = row.get("path"), row.get("label"), row.get("split")
        if not isinstance(p, str) or not p.strip():
            raise SourceError(f"{path}:{n}: missing or empty `path`")
        if label is None or isinstance(label, (dict, list, bool)) or str(label).strip() == "":
            raise SourceError(f"{path}:{n}: missing or empty `label` (a class name or integer)")
        if split is not None and split != "" and not SPLIT_NAME.fullmatch(str(split)):
            raise SourceError(f"{path}:{n}: split {split!r} must be letters, digits or _ (it names the shards)")
        paths.append(p.strip())
        names.append(str(label).strip())
        splits.append(str(split) if split not in (None, "") else None)
        lines.append(n)
    if not paths:
        raise SourceError(f"{path} lists no images: nothing to write; expected one row per image "
                          "(`path,label[,split]`)")
    has_split = [s is not None for s in splits]
    if any(has_split) and not all(has_split):
        raise SourceError(f"{path}:{lines[has_split.index(False)]}: row has no split while others do; "
                          "give every row a split or none")
    classes = sort_classes(names)
    index = {c: i for i, c in enumerate(classes)}
    listing = Listing(root=path.parent, paths=paths, labels=np.array([index[c] for c in names], np.int32),
                      classes=classes)
    if all(has_split):
        listing.split_names = tuple(sort_splits(set(splits)))
        sid = {s: i for i, s in enumerate(listing.split_names)}
        listing.split_ids = np.array([sid[s] for s in splits], np.int16)
    return listing


def sort_splits(names: Iterable[str]) -> list[str]:
    """train first, then val, then the rest by name."""
    rank = {"train": 0, "val": 1}
    return sorted(set(names), key=lambda s: (rank.get(s, 2), s))


def detect_format(src: str) -> str:
    """What SRC is: folder | list | tar-of-tars | tar | parquet | shards (see FORMATS)."""
    p = Path(src)
    if not p.exists():
        if any(c in src for c in "*?[{"):
            return "parquet" if src.endswith(".parquet") else "shards"
        raise SourceError(f"source {src} does not exist: give an ImageFolder tree, a .csv/.jsonl list, a .tar "
                          "(.tar.gz), .parquet files or WebDataset shards")
    if p.is_dir():
        if (p / "dataset.json").exists():
            return "shards"
        entries = [e for e in os.scandir(p) if not _hidden(e.name)]
        if entries and not any(e.is_dir() for e in entries):
            if any(e.name.endswith(".parquet") for e in entries):
                return "parquet"
            if any(e.name.endswith(".tar") for e in entries):
                return "shards"
        return "folder"
    name = p.name.lower()
    if name.endswith(LIST_SUFFIXES):
        return "list"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".json"):
        return "shards"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return _tar_kind(p)
    raise SourceError(f"source {src} is a file but not a .csv or .jsonl list (columns path,label[,split]), a .tar "
                      "(.tar.gz), a .parquet or a dataset.json; say which with --source-format")


def _tar_kind(path: Path) -> str:
    """tar-of-tars if its first file member is a .tar, shards if a sample has a .cls member, else a flat tar."""
    import tarfile

    try:
        with tarfile.open(path) as tar:
            for k, m in enumerate(tar):
                if m.isfile() and m.name.endswith(".tar") and k < 8:
                    return "tar-of-tars"
                if m.isfile() and m.name.endswith(".cls"):
                    return "shards"
                if k >= 8:
                    break
    except (tarfile.TarError, OSError, EOFError) as e:
        raise SourceError(f"{path}: not a readable tar ({e})") from None
    return "tar"


def list_source(src: str | os.PathLike, map_fn: Callable = map, *, source_format: str = "auto",
                labels: str | None = None, image_column: str | None = None, label_column: str | None = None,
                cache_dir: Path | None = None, nodes: tuple[int, int] = (0, 1)) -> Listing:
    """List any supported source (module docstring); a clear `SourceError` if it can't be used.

    Archive and parquet listings also hash every entry (`Listing.index`), in workers via `map_fn`, caching each
    unit's result under `cache_dir` so a rerun or another node reuses it."""
    if source_format not in FORMATS:
        raise SourceError(f"--source-format must be one of {', '.join(FORMATS)}, got {source_format!r}")
    src = str(src)
    fmt = detect_format(src) if source_format == "auto" else source_format
    if labels and fmt != "tar":
        raise SourceError(f"--labels is for a flat tar of images; {src} is read as {fmt}")
    if labels and not Path(labels).is_file():
        raise SourceError(f"--labels {labels} does not exist: give a CSV/JSONL of member name,label[,split]")
    if fmt in ("folder", "list", "tar-of-tars", "tar") and not Path(src).exists():
        raise SourceError(f"source {src} does not exist")
    if fmt == "folder":
        return list_image_folder(Path(src).resolve(), map_fn)
    if fmt == "list":
        return list_file(Path(src).resolve())
    from data_prep import archives, parquet_source

    if fmt == "tar-of-tars":
        return archives.list_tar_of_tars(src, map_fn, cache_dir, nodes)
    if fmt == "tar":
        return archives.list_flat_tar(src, labels, cache_dir, nodes)
    if fmt == "parquet":
        return parquet_source.list_parquet(src, image_column, label_column, map_fn, cache_dir, nodes)
    return archives.list_shards(src, label_column or "cls", map_fn, cache_dir, nodes)
