"""vitscale data_prep: image datasets -> WebDataset tar shards (DESIGN contract 1), and their checks.

Python API: `write_shards(src, out, **options) -> manifest`, `merge(out) -> manifest`,
`verify(out, decode=False) -> [problems]`, `write_example_images(out_dir, dataset="digits")`.
The CLI is `python -m data_prep write|merge|verify|stats|preview|example`.
"""

from data_prep.examples import write_example_images
from data_prep.manifest import ManifestError, merge
from data_prep.sources import SourceError
from data_prep.verify import preview, stats_table, verify
from data_prep.writer import write_shards

__all__ = ["ManifestError", "SourceError", "merge", "preview", "stats_table", "verify", "write_example_images",
           "write_shards"]
