"""vitscale data_prep: image datasets -> WebDataset tar shards (format: docs/formats.md), and their checks.

Sources: ImageFolder trees, CSV/JSONL lists, ImageNet's tar-of-tars (.tar/.tar.gz, never extracted), flat tars
with a labels file, Hugging Face parquet files and existing shards (`sources.list_source`); optional filters:
exact duplicates, `--exclude-hashes`, near copies of downstream images (`near.py`), `--min-per-class`.

Python API: `write_shards(src, out, **options) -> manifest`, `merge(out) -> manifest`,
`verify(out, decode=False) -> [problems]`, `write_example_images(out_dir, dataset="digits")`.
The CLI is `python -m data_prep write|merge|verify|stats|preview|example`.
"""

import importlib

# Loaded on first use (PEP 562): the writer and verifier pull in webdataset and torch, which a reader of
# `data_prep.stream_config` (every recipe load, the launcher's preflight) does not need.
_WHERE = {"write_example_images": "examples", "ManifestError": "manifest", "merge": "manifest",
          "SourceError": "sources", "preview": "verify", "stats_table": "verify", "verify": "verify",
          "write_shards": "writer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"data_prep.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
