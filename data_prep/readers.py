"""Read the bytes of listed images, whatever holds them: files, a tar's members, a gzip'd tar's members, parquet rows.

A listing names where each image lives (`Listing.loc(i)`); the workers (content index, shard writer,
near-duplicate hashing) read through `read_locs`, which yields the bytes (or a `Reject`) in the order asked.
Nothing is ever extracted to disk, and memory stays bounded whatever an archive's size:

- `file`: one file at a time.
- `tar`: `os.pread` of one member's bytes at its offset in the (uncompressed) archive; no other byte is read.
- `gztar`: a `.tar.gz` has no random access: the members asked for are read in archive order through one
  forward pass of the decompressor (which stops after the last one), then handed out in the asked order;
  memory is the asked members' bytes. Only downstream sets (`--exclude-near`) are read this way, in one pass;
  the writer reads a `.tar.gz` source from the spool its listing pass made (`archives.py`), as a `tar`.
- `parquet`: the row groups that hold the asked rows, one at a time, image column only; memory is one row
  group plus the asked rows' bytes.
"""

from __future__ import annotations

import gzip
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence

from data_prep.images import Reject

KINDS = ("file", "tar", "gztar", "parquet")


def _read_file(root: str, rel: str) -> bytes | Reject:
    try:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()
    except OSError as e:
        return Reject("unreadable", e.strerror or str(e))


def _read_tar(locs: Sequence[tuple[str, int, int]]) -> Iterator[bytes | Reject]:
    fds: dict[str, int] = {}
    try:
        for path, offset, size in locs:
            try:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                data = os.pread(fds[path], size, offset)
            except OSError as e:
                yield Reject("unreadable", e.strerror or str(e))
                continue
            yield data if len(data) == size else Reject("unreadable", f"archive ends {size - len(data)} bytes early")
    finally:
        for fd in fds.values():
            os.close(fd)


SKIP_CHUNK = 4 << 20  # decompressed bytes skipped per read when seeking forward in a gzip stream


def _skip_to(f, offset: int) -> None:
    """Seek a gzip stream forward to `offset` in big reads (GzipFile.seek discards 8 KB at a time)."""
    while f.tell() < offset:
        if not f.read(min(SKIP_CHUNK, offset - f.tell())):
            raise EOFError(f"archive ends before offset {offset}")


def _gztar_in_archive_order(locs: Sequence[tuple[str, int, int]]) -> Iterator[tuple[int, bytes | Reject]]:
    """(k, bytes of locs[k]) in archive order: one forward pass per archive, one member in memory at a time."""
    by_file = defaultdict(list)
    for k, (path, offset, size) in enumerate(locs):
        by_file[path].append((offset, size, k))
    for path, wanted in by_file.items():
        done = 0
        try:
            with gzip.open(path, "rb") as f:
                for offset, size, k in sorted(wanted):
                    _skip_to(f, offset)  # forward only: decompresses what lies between
                    data = f.read(size)
                    done += 1
                    yield k, data if len(data) == size else Reject("unreadable", "archive ends early")
        except (OSError, EOFError) as e:
            for _, _, k in sorted(wanted)[done:]:
                yield k, Reject("unreadable", str(e))


def _read_gztar(locs: Sequence[tuple[str, int, int]]) -> list[bytes | Reject]:
    out: list[bytes | Reject] = [Reject("unreadable", "not read")] * len(locs)
    for k, data in _gztar_in_archive_order(locs):
        out[k] = data
    return out


def _read_parquet(locs: Sequence[tuple[str, int, int]], column: str) -> list[bytes | Reject]:
    from data_prep.parquet_source import image_bytes, open_parquet

    out: list[bytes | Reject] = [Reject("unreadable", "not read")] * len(locs)
    groups = defaultdict(list)
    for k, (path, group, row) in enumerate(locs):
        groups[(path, group)].append((row, k))
    for (path, group), rows in sorted(groups.items()):
        try:
            table = open_parquet(path).read_row_group(group, columns=[column])
        except OSError as e:
            for _, k in rows:
                out[k] = Reject("unreadable", str(e))
            continue
        values = table.column(0)
        for row, k in rows:
            data = image_bytes(values[row].as_py())
            out[k] = data if data else Reject("empty", "no image bytes in the row")
    return out


def read_locs_any_order(kind: str, root: str, locs: Sequence, column: str = "") -> Iterator[tuple[int, bytes | Reject]]:
    """(k, bytes at locs[k]) in whatever order reads them fastest: archive order for a `.tar.gz`, holding one
    member at a time (a whole downstream set is hashed this way in one pass), else the asked order."""
    if kind == "gztar":
        return _gztar_in_archive_order(locs)
    return enumerate(read_locs(kind, root, locs, column))


def read_locs(kind: str, root: str, locs: Sequence, column: str = "") -> Iterator[bytes | Reject]:
    """The bytes at each of `locs` (as `Listing.loc` gives them), in order; a `Reject` where unreadable."""
    if kind == "file":
        return (_read_file(root, rel) for rel in locs)
    if kind == "tar":
        return _read_tar(locs)
    if kind == "gztar":
        return iter(_read_gztar(locs))
    if kind == "parquet":
        return iter(_read_parquet(locs, column))
    raise ValueError(f"unknown source kind {kind!r}: one of {', '.join(KINDS)}")
