"""Shard-writing throughput: `data_prep.write_shards` against a naive single-process webdataset loop.

Inputs: `--n` generated 500x375 JPEGs (crops of scikit-learn's sample photos, quality 90) plus the two
real photos (640x427), in two class folders. Two paths, each run by both contenders in the same process:

- pass-through: JPEG bytes stored as they are, every image still checked to decode;
- resize: shorter side to 256 px (bicubic), EXIF orientation applied, RGB, JPEG quality 90.

The peer does the same work per image in the obvious way: read, sha256 + exact-duplicate set, PIL
decode (full), [orient, convert, resize, encode], `webdataset.ShardWriter.write`. Ours runs
`write_shards(..., workers=--workers)` (listing, content index, plan, workers, manifest: all included).

Then the same images as ImageNet ships them, a tar-of-tars (one inner tar per class, uncompressed): ours
reading the archive (never extracted) against ours reading the extracted ImageFolder tree, pass-through.

Usage: python bench/shard_write.py [--n 1000] [--workers 2] [--repeats 2]
Prints images/s per path and contender; the ratios (ours / peer, tar-of-tars / folder) come last.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import resource
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402

from data_prep import write_shards  # noqa: E402
from data_prep.examples import photo_crops, sample_photos  # noqa: E402

SIZE = 256


def make_inputs(root: Path, n: int) -> int:
    """n generated 500x375 JPEGs + the real photos, under root/<photo name>/; returns the file count."""
    for name, img in sample_photos().items():
        (root / name).mkdir(parents=True)
        Image.fromarray(img).save(root / name / "photo.jpg", quality=90)
    for k, (name, crop) in enumerate(photo_crops(n, size=(500, 375), seed=0)):
        crop.save(root / name / f"{k:06d}.jpg", quality=90)
    return n + 2


def make_tar_of_tars(src: Path, dest: Path) -> Path:
    """The ImageFolder tree as one uncompressed tar holding one tar per class folder (ImageNet's layout)."""
    with tarfile.open(dest, "w") as outer:
        for cls in sorted(os.listdir(src)):
            inner = dest.parent / f"{cls}.tar"
            with tarfile.open(inner, "w") as tar:
                for f in sorted(os.listdir(src / cls)):
                    tar.add(src / cls / f, arcname=f"{cls}_{f}")
            outer.add(inner, arcname=inner.name)
            inner.unlink()
    return dest


def naive(src: Path, out: Path, resize: bool, per_shard: int) -> int:
    """The peer: one process, one image after another, into webdataset.ShardWriter."""
    classes = sorted(os.listdir(src))
    files = [(src / c / f, i) for i, c in enumerate(classes) for f in sorted(os.listdir(src / c))]
    seen, written = set(), 0
    with wds.ShardWriter(str(out / "naive-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for k, (path, label) in enumerate(files):
            data = path.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                continue
            seen.add(sha)
            img = Image.open(io.BytesIO(data))
            img.load()  # validate: a truncated file raises here
            stored = data
            if resize:
                img = ImageOps.exif_transpose(img).convert("RGB")
                scale = SIZE / min(img.size)
                if scale < 1:
                    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                stored = buf.getvalue()
            meta = {"label": classes[label], "src": str(path.relative_to(src)), "width": img.width,
                    "height": img.height, "sha256": hashlib.sha256(stored).hexdigest()}
            sink.write({"__key__": f"{k:08d}", "jpg": stored, "cls": label, "json": meta})
            written += 1
    return written


def tar_of_tars(archive: Path, src: Path, out: Path, per_shard: int, workers: int, repeats: int) -> dict:
    """Best (images/s, images per CPU-s) of ours on the archive and on the extracted folder, pass-through,
    alternating (the CPU figure is the steadier one on a machine shared with other jobs)."""
    best = {"folder": (0.0, 0.0), "tar-of-tars": (0.0, 0.0)}
    for r in range(repeats):
        for who, path in (("folder", src), ("tar-of-tars", archive)):
            secs, cpu, n = timed(ours, path, out / f"{who}-{r}", False, per_shard, workers)
            best[who] = (max(best[who][0], n / secs), max(best[who][1], n / cpu))
            shutil.rmtree(out / f"{who}-{r}")
    return best


def ours(src: Path, out: Path, resize: bool, per_shard: int, workers: int) -> int:
    m = write_shards(src, out, workers=workers, resize_shorter=SIZE if resize else None, samples_per_shard=per_shard)
    return sum(s["samples"] for s in m["splits"].values())


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *args) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, images written)."""
    t0, c0 = time.perf_counter(), _cpu()
    n = fn(*args)
    return time.perf_counter() - t0, _cpu() - c0, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1000, help="generated 500x375 JPEGs")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--samples-per-shard", type=int, default=125, help="both contenders")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per contender")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_shard_write_"))
    try:
        src = tmp / "src"
        count = make_inputs(src, args.n)
        print(f"{count} JPEGs ({args.n} at 500x375 + 2 photos at 640x427), {args.workers} workers, "
              f"{os.cpu_count()} CPUs, best of {args.repeats}")
        rates = {}
        for path, resize in (("pass-through", False), ("resize-256", True)):
            best = {"peer": (0.0, 0.0), "ours": (0.0, 0.0)}  # (img/s, CPU ms per image)
            for r in range(args.repeats):
                for who in ("peer", "ours"):  # alternate, so both see the same machine load
                    out = tmp / f"{who}-{path}-{r}"
                    out.mkdir()
                    shard = args.samples_per_shard
                    secs, cpu, n = (timed(naive, src, out, resize, shard) if who == "peer"
                                    else timed(ours, src, out, resize, shard, args.workers))
                    best[who] = max(best[who], (n / secs, 1e3 * cpu / n))
                    shutil.rmtree(out)
            rates[path] = {who: v[0] for who, v in best.items()}
            print(f"{path:<13} peer {best['peer'][0]:7.1f} img/s ({best['peer'][1]:.2f} CPU ms/img)   "
                  f"ours {best['ours'][0]:7.1f} img/s ({best['ours'][1]:.2f} CPU ms/img)")
        archive = make_tar_of_tars(src, tmp / "whole.tar")
        tot = tar_of_tars(archive, src, tmp, args.samples_per_shard, args.workers, args.repeats)
        (fw, fc), (tw, tc) = tot["folder"], tot["tar-of-tars"]
        print(f"{'pass-through':<13} folder {fw:7.1f} img/s ({1e3 / fc:.2f} CPU ms/img)   tar-of-tars {tw:7.1f} img/s "
              f"({1e3 / tc:.2f} CPU ms/img): the same images, never extracted")
        print(f"ratio resize-256 (ours/peer): {rates['resize-256']['ours'] / rates['resize-256']['peer']:.2f}x")
        print(f"ratio pass-through (ours/peer): {rates['pass-through']['ours'] / rates['pass-through']['peer']:.2f}x")
        print(f"ratio tar-of-tars/folder pass-through (target >= 1.0): {tw / fw:.2f}x wall, {tc / fc:.2f}x per CPU-s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
