"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A reader (or a crash) never sees a half-written file: it sees the old one or the new one. The same holds for a
console line that several ranks share (`say`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


def say(text: str, stream: TextIO | None = None) -> None:
    """Print one line in one write. The ranks share the console and run unbuffered (`python -u`), where
    `print` writes the text and its newline separately: two ranks' lines could then run together into one."""
    stream = stream or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be written in (made first if it does not exist), or None if it can: the first part of
    it that exists is a file, or this process may not write there."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {existing}"
    return None


def output_problem(path: str | os.PathLike, option: str, folder: bool = False) -> str | None:
    """Why `path` (the value of `option`) cannot take an output file (with `folder`: a folder of outputs), with
    the fix, or None: a folder where a file goes, a file where a folder goes, a path under a file, no permission."""
    path = Path(path)
    named = f"{option}{path}" if option.endswith("=") else f"{option} {path}"  # `out=F` or `--out F`
    if folder and path.exists() and not path.is_dir():
        return f"{named} is a file; this writes a folder of files: pass a folder"
    if not folder and path.is_dir():
        return f"{named} is a folder; pass a file name"
    why = unwritable(path if folder else path.parent)
    return f"{named}: {why}; pass another {option.rstrip('=')}" if why else None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit rename it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` (bytes or text) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = 2) -> Path:
    """Write `obj` as JSON to `path` atomically (keys in insertion order, trailing newline)."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")
