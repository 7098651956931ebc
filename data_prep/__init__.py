"""vitscale data_prep: image datasets -> WebDataset tar shards (format: docs/formats.md), and their checks.

Sources: ImageFolder trees, CSV/JSONL lists, ImageNet's tar-of-tars (.tar/.tar.gz, never extracted), flat tars
with a labels file, Hugging Face parquet files and existing shards (`sources.list_source`); optional filters:
exact duplicates, `--exclude-hashes`, near copies of downstream images (`near.py`), `--min-per-class`.

Python API: `write_shards(src, out, **options) -> manifest`, `merge(out) -> manifest`,
`verify(out, decode=False) -> [problems]`, `write_example_images(out_dir, dataset="digits")`.
The CLI is `python -m data_prep write|merge|verify|stats|preview|example`.
"""

from data_prep.examples import write_example_images
from data_prep.manifest import ManifestError, merge
from data_prep.sources import SourceError
from data_prep.verify import preview, stats_table, verify

__all__ = ["ManifestError", "SourceError", "merge", "preview", "stats_table", "verify", "write_example_images",
           "write_shards"]


def __getattr__(name: str) -> object:
    # write_shards loads on first use (PEP 562): the writer imports webdataset, hence torch, which a reader of
    # `data_prep.stream_config` (every recipe load, the launcher's preflight) does not need.
    if name != "write_shards":
        raise AttributeError(f"module 'data_prep' has no attribute {name!r}")
    from data_prep.writer import write_shards

    globals()["write_shards"] = write_shards
    return write_shards
