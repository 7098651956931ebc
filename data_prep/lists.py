"""The files `write`'s options name: `--exclude-hashes` (digests, or another dataset) and `--class-names`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from data_prep.manifest import read_manifest
from data_prep.sources import open_text
from data_prep.verify import iter_samples


def load_exclude_hashes(path: str | os.PathLike) -> set[bytes]:
    """sha256 digests to keep out: a text file (one hex digest a line) or another dataset's dataset.json
    (or its folder), whose samples' source and stored hashes are read from its shards."""
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.exists():
        raise FileNotFoundError(f"--exclude-hashes {path} does not exist")
    if path.suffix == ".json":
        manifest, hashes = read_manifest(path), set()
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                for _, sample in iter_samples(path.parent / shard["name"]):
                    meta = json.loads(sample["json"])
                    hashes.update(bytes.fromhex(meta[k]) for k in ("sha256", "src_sha256") if k in meta)
        return hashes
    hashes = set()
    with open_text(path, "--exclude-hashes") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#")[0].strip()
            if line:
                try:
                    hashes.add(bytes.fromhex(line))
                except ValueError:
                    raise ValueError(f"{path}:{n}: not a hex sha256 digest: {line[:80]}") from None
    return hashes


def load_class_names(path: str | os.PathLike) -> dict[str, str]:
    """Class id -> human name from a text file of `id<whitespace>name` lines (ImageNet's `words.txt`,
    `LOC_synset_mapping.txt`)."""
    try:
        with open_text(path, "--class-names") as f:
            text = f.read()
    except OSError as e:
        raise FileNotFoundError(f"--class-names {path}: {e.strerror or e}") from None
    names = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            parts = line.strip().split(None, 1)
            if len(parts) != 2:
                raise ValueError(f"{path}:{n}: expected `class_id name`, got {line.strip()[:80]!r}")
            names[parts[0]] = parts[1].strip()
    return names
