"""`python -m data_prep <verb>`: write | merge | verify | stats | preview | example.

  write SRC OUT [options]   images -> tar shards + dataset.json; SRC: an ImageFolder tree, a .csv/.jsonl list, a
                            tar-of-tars (ImageNet), a flat tar (+ --labels), parquet files, or WebDataset shards
  merge OUT                 dataset.json from the shards of every node of a --num-nodes run
  verify OUT [--decode]     check every shard against dataset.json; exit 1 and list what is wrong
  stats OUT                 the manifest as a table: splits, label histogram, image sizes
  preview OUT --out G.png   a grid of samples with their labels
  example OUT               real example images (sklearn digits or photos) as an ImageFolder tree
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from data_prep.examples import DATASETS, write_example_images
from data_prep.images import FORMATS, MIN_SIZE
from data_prep.manifest import ManifestError, merge, summary_table
from data_prep.near import NEAR_THRESHOLD
from data_prep.sources import FORMATS as SOURCE_FORMATS
from data_prep.sources import SourceError
from data_prep.verify import preview, stats_table, verify
from data_prep.writer import DiskFullError, write_shards
from runtime.argtypes import count, index


def _write_parser(sub) -> None:
    w = sub.add_parser("write", help="write tar shards + dataset.json from an image folder or list")
    w.add_argument("src", help="ImageFolder tree (SRC/<class>/<image>), .csv/.jsonl list of path,label[,split], "
                   ".tar/.tar.gz (tar-of-tars or flat), .parquet file/folder/glob, or shards (brace pattern, "
                   "folder of .tar, dataset.json)")
    w.add_argument("out", help="output folder")
    g = w.add_argument_group("source")
    g.add_argument("--source-format", choices=SOURCE_FORMATS, default="auto",
                   help="what SRC is (auto: from its name and contents)")
    g.add_argument("--labels", default=None, help="flat tar: CSV/JSONL of member name -> label[, split] "
                   "(path,label[,split])")
    g.add_argument("--image-column", default=None, help="parquet: the image column (default: image)")
    g.add_argument("--label-column", default=None, help="parquet: the label column (default: label); shards: the "
                   "label member (default: cls) or json:FIELD")
    g.add_argument("--class-names", default=None, help="text file of `class_id name` lines (ImageNet's words.txt): "
                   "human names in dataset.json")
    g.add_argument("--min-per-class", type=int, default=0, help="drop classes with fewer usable images than this "
                   "(ImageNet-21K-P uses 500)")
    g.add_argument("--exclude-near", default=None, help="comma-separated downstream sets (any SRC kind): drop "
                   "training images within --near-threshold bits of one of their images (perceptual hash)")
    g.add_argument("--near-threshold", type=int, default=NEAR_THRESHOLD, help="Hamming distance of 64-bit pHashes "
                   "(default %(default)s: measured in data_prep/near.py)")
    g = w.add_argument_group("splits and shards")
    g.add_argument("--val-fraction", type=float, default=0.0, help="class-stratified hold-out for a val split")
    g.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    g.add_argument("--max-shard-bytes", type=int, default=None, help="cut shards by estimated size too")
    g.add_argument("--seed", type=int, default=0, help="seed of the global shuffle and the hold-out")
    g = w.add_argument_group("images")
    g.add_argument("--resize-shorter", type=int, default=None, help="shorter side to S px (never upscales)")
    g.add_argument("--resize-longer", type=int, default=None, help="longer side to at most S px")
    g.add_argument("--format", choices=FORMATS, default="keep", help="keep passes JPEG/PNG/WebP through if unchanged")
    g.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality when re-encoding")
    g.add_argument("--min-size", type=int, default=MIN_SIZE, help="reject images whose shorter side is under this")
    g.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicates")
    g.add_argument("--exclude-hashes", default=None,
                   help="skip images whose sha256 is listed: a text file of hex digests, or a dataset.json")
    g = w.add_argument_group("parallelism")
    g.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="worker processes, default: the CPUs this process may use (the output is the same for any)")
    g.add_argument("--num-nodes", type=count, default=None, help="default: SLURM_ARRAY_TASK_COUNT, else 1")
    g.add_argument("--node-rank", type=index, default=None, help="default: SLURM_ARRAY_TASK_ID, else 0")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help; not for flags (off unless given), positional or required
    arguments, nor where the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.required or not action.option_strings or "default" in (action.help or ""):
            return action.help or ""
        if action.default is None:
            return f"{action.help} (default: none)"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    _write_parser(sub)
    m = sub.add_parser("merge", help="write dataset.json once every node is done")
    m.add_argument("out", help="the shard folder every node wrote into")
    m.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    v = sub.add_parser("verify", help="check shards against dataset.json (exit 1 on any problem)")
    v.add_argument("out", help="the shard folder written by `write`")
    v.add_argument("--decode", action="store_true", help="also decode every image")
    v.add_argument("--workers", type=count, default=1, help="worker processes")
    v.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    s = sub.add_parser("stats", help="the manifest as a readable table")
    s.add_argument("out", help="the shard folder written by `write`")
    s.add_argument("--max-classes", type=count, default=40, help="rows of the label histogram")
    pv = sub.add_parser("preview", help="a PNG grid of samples with their labels")
    pv.add_argument("out", help="the shard folder written by `write`")
    pv.add_argument("--out", dest="dest", required=True, help="PNG file to write")
    pv.add_argument("--n", type=count, default=64, help="samples shown")
    pv.add_argument("--split", default="train", help="the split they come from")
    e = sub.add_parser("example", help="write real example images as an ImageFolder tree")
    e.add_argument("out", help="folder of the ImageFolder tree")
    e.add_argument("--dataset", choices=DATASETS, default="digits", help="which images")
    e.add_argument("--size", type=count, default=32, help="digits: pixels per side")
    e.add_argument("--per-class", type=count, default=None, help="images per class (default: all there are)")
    for verb in sub.choices.values():  # every verb's --help shows its defaults
        verb.formatter_class = _DefaultsShown
    return p


def _total(manifest: dict) -> int:
    return sum(s["samples"] for s in manifest["splits"].values())


def run(args: argparse.Namespace) -> int:
    if args.verb == "write":
        opts = {k: v for k, v in vars(args).items() if k not in ("verb", "src", "out")}
        result = write_shards(args.src, args.out, log=print, **opts)
        if "splits" in result and _total(result) == 0:
            print(f"error: no usable image in {args.src}; every input was rejected (see {args.out}/rejects.jsonl)",
                  file=sys.stderr)
            return 1
        return 0
    if args.verb == "merge":
        print(summary_table(merge(args.out, progress=args.progress)))
        return 0
    if args.verb == "verify":
        problems = verify(args.out, decode=args.decode, workers=args.workers, progress=args.progress)
        for line in problems:
            print(line)
        print(f"{len(problems)} problem(s) found" if problems else f"{args.out}: all shards verified")
        return 1 if problems else 0
    if args.verb == "stats":
        print(stats_table(args.out, args.max_classes))
        return 0
    if args.verb == "preview":
        print(preview(args.out, args.dest, n=args.n, split=args.split))
        return 0
    print(write_example_images(args.out, args.dataset, size=args.size, per_class=args.per_class))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SourceError, ManifestError, ValueError, FileNotFoundError, FileExistsError, DiskFullError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = "; the finished shards are kept: rerun the same command to resume" if args.verb == "write" else ""
        print(f"interrupted (Ctrl-C){resume}", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    raise SystemExit(main())
