"""Near-duplicate filter (`data_prep write --exclude-near`): how well the pHash separates copies from distinct
images, how fast it hashes, how fast the multi-index looks up against a million downstream hashes, and what
the filter adds to a pass-through write.

- distances: downstream-like images (crops of scikit-learn's sample photos at 96-500 px, and its digits at
  64 px) against their copies (JPEG q60, resized 0.8x, cropped 5 % centred, grayscale-RGB), and 1,000 distinct
  images (digits) against 200 others (photo crops): what the default `--near-threshold` is chosen from.
- hashing: `phash_bytes` on 500x375 JPEGs, one process (hashes/s per core).
- lookup: `NearIndex.lookup_many` in batches of 64, as the writer calls it (ours), against a full numpy scan
  (the peer) of 1 M hashes, per query.
- write: `write_shards` pass-through of --n JPEGs with and without `--exclude-near` (a small real downstream set
  hashed during the run); the per-image lookup cost at 1 M hashes is added on top for the projected overhead.

Usage: python bench/near_dup.py [--n 400] [--workers 2] [--lookups 2000]
Prints the figures; the ratios (ours/peer lookup speed, write time with/without the filter) come last.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import write_shards  # noqa: E402
from data_prep.examples import load_digits, photo_crops  # noqa: E402
from data_prep.near import NEAR_THRESHOLD, NearIndex, hamming, phash_bytes  # noqa: E402


def _enc(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def copies(img: Image.Image) -> dict[str, bytes]:
    w, h = img.size
    cw, ch = round(w * 0.025), round(h * 0.025)
    return {"jpeg-q60": _enc(img, "JPEG", quality=60),
            "resize-0.8x": _enc(img.resize((round(w * 0.8), round(h * 0.8)), Image.Resampling.BICUBIC)),
            "crop-5%": _enc(img.crop((cw, ch, w - cw, h - ch))),
            "grey": _enc(img.convert("L").convert("RGB"), "JPEG", quality=90)}


def digits(n: int, size: int) -> list[Image.Image]:
    images, _ = load_digits()
    return [Image.fromarray((images[k] * 15).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
            .convert("RGB") for k in range(n)]


def distances() -> None:
    sizes = [(96, 72), (160, 120), (320, 240), (500, 375), (128, 128)]
    originals = [c.resize(sizes[k % 5]) for k, (_, c) in enumerate(photo_crops(200, seed=3))] + digits(200, 64)
    by_kind: dict[str, list[int]] = {}
    for img in originals:
        h = phash_bytes(_enc(img, "JPEG", quality=92))
        for kind, data in copies(img).items():
            by_kind.setdefault(kind, []).append(int(hamming(h, phash_bytes(data))))
    every = np.concatenate([np.array(v) for v in by_kind.values()])
    for kind, d in by_kind.items():
        print(f"copies {kind:<12} distance max {max(d):2d}  p99 {np.percentile(d, 99):4.1f}  mean {np.mean(d):4.1f}")
    print(f"copies (all {len(every)})      max {every.max():2d}  p99 {np.percentile(every, 99):4.1f}  "
          f"caught at {NEAR_THRESHOLD}: {np.mean(every <= NEAR_THRESHOLD):.1%}")
    distinct = np.array([phash_bytes(_enc(g)) for g in digits(1000, 32)], np.uint64)
    others = np.array([phash_bytes(_enc(c, "JPEG", quality=90)) for _, c in photo_crops(200, seed=9)], np.uint64)
    closest = hamming(distinct[:, None], others[None, :]).min(1)
    print(f"distinct: 1000 digits vs 200 photo crops, closest distance min {closest.min()}  "
          f"p1 {np.percentile(closest, 1):.0f}  median {np.median(closest):.0f}; "
          f"false drops at {NEAR_THRESHOLD}: {(closest <= NEAR_THRESHOLD).sum()}")


def hashing_rate(n: int) -> float:
    jpegs = [_enc(c, "JPEG", quality=90) for _, c in photo_crops(n, size=(500, 375), seed=0)]
    t = time.perf_counter()
    for data in jpegs:
        phash_bytes(data)
    return n / (time.perf_counter() - t)


def lookups(n_queries: int) -> tuple[float, float]:
    """(ours, full scan) seconds per query against 1 M hashes; half the queries hit."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 2**63, 1_000_000, dtype=np.uint64)
    index = NearIndex.build(stored, NEAR_THRESHOLD)
    queries = np.concatenate([stored[:n_queries // 2] ^ np.uint64(0b1011),
                              rng.integers(0, 2**63, n_queries - n_queries // 2, dtype=np.uint64)])
    t = time.perf_counter()
    ours = [hit for a in range(0, n_queries, 64) for hit in index.lookup_many(queries[a:a + 64])]
    ours_s = (time.perf_counter() - t) / n_queries  # in batches of 64, as the writer looks up
    t = time.perf_counter()
    for q, mine in zip(queries[:200], ours[:200], strict=True):
        d = hamming(stored, q)
        assert (mine is not None) == (d.min() <= NEAR_THRESHOLD)
    return ours_s, (time.perf_counter() - t) / 200


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def write_overhead(tmp: Path, n: int, workers: int) -> dict[str, tuple[float, float]]:
    """who -> best (wall s, CPU s) of the write without and with the filter."""
    src, down = tmp / "src" / "photos", tmp / "down" / "any"
    src.mkdir(parents=True)
    down.mkdir(parents=True)
    for k, (_, crop) in enumerate(photo_crops(n, size=(500, 375), seed=0)):
        crop.save(src / f"{k:06d}.jpg", quality=90)
    for k, img in enumerate(digits(100, 64)):
        img.save(down / f"{k}.png")
    best = {}
    for r in range(3):
        for who, near in (("without", None), ("with", str(tmp / "down"))):  # alternate: the same machine load
            t, c = time.perf_counter(), _cpu()
            write_shards(tmp / "src", tmp / f"out-{who}-{r}", workers=workers, exclude_near=near)
            wall, cpu = time.perf_counter() - t, _cpu() - c
            best[who] = (min(best.get(who, (1e9, 1e9))[0], wall), min(best.get(who, (1e9, 1e9))[1], cpu))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="500x375 JPEGs written and hashed")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--lookups", type=int, default=2000)
    args = p.parse_args()
    distances()
    rate = hashing_rate(args.n)
    print(f"hashing: {rate:.0f} hashes/s per core (500x375 JPEG, decoded at 1/8 scale)")
    ours_s, scan_s = lookups(args.lookups)
    print(f"lookup against 1 M hashes: multi-index {ours_s * 1e6:.0f} us, full scan {scan_s * 1e6:.0f} us per query")
    tmp = Path(tempfile.mkdtemp(prefix="bench_near_dup_"))
    try:
        best = write_overhead(tmp, args.n, args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (wall0, cpu0), (wall1, cpu1) = best["without"], best["with"]
    cpu_1m = cpu1 + args.n * ours_s  # as if the downstream index held 1 M hashes
    print(f"write {args.n} JPEGs pass-through, {args.workers} workers: without {wall0:.2f} s ({cpu0:.2f} CPU s), "
          f"with --exclude-near of 100 downstream images {wall1:.2f} s ({cpu1:.2f} CPU s), "
          f"{cpu_1m:.2f} CPU s projected at 1 M downstream hashes")
    print(f"ratio lookup full-scan/multi-index at 1 M (ours/peer speed): {scan_s / ours_s:.1f}x")
    print(f"ratio write with/without --exclude-near at 1 M hashes, CPU s (target <= 1.15): {cpu_1m / cpu0:.2f}x; "
          f"wall at 100 hashes {wall1 / wall0:.2f}x")


if __name__ == "__main__":
    main()
