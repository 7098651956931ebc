"""Stream load: 2 ranks x 2 workers over many tiny shards for a sustained run; memory flat, no fd leak, steady.

`python -m tests.faults.stream_load DATA OUT SECONDS INTERVAL` (under torchrun) is the per-rank driver: it
iterates the training stream epoch after epoch and, every INTERVAL seconds, records the samples delivered and
the RSS and open file descriptors of the rank and its DataLoader workers in OUT/rank{r}.jsonl.
"""

from __future__ import annotations

import hashlib
import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

from PIL import Image

from tests.conftest import run_torchrun
from tests.faults.harness import Ctx, Outcome, scenario

SAMPLES_PER_SHARD = 8
MICRO_BATCH = 32
WORKERS = 2
# The fd and RSS rules judge a trend, not two samples: every INTERVAL the driver records the figures, the first
# WARMUP share of them is left out (imports, shuffle buffers and prefetch queues filling), and a least-squares
# line through the rest, times the run's length, is the growth the run showed. A sample catches each worker
# between shards, so the fd count of a rank and its workers swings by a few (seen 50-57 in one 20 s run; one
# two-sample comparison failed on 56 -> 59); the slope averages those swings out over every sample. Its worst
# case for such noise, a swing of A that happens to be low for the first half and high for the second, reads
# as 1.5 A over the judged span (2 A over the whole run): 2 x 7 = 14 stays under FDS_BOUND. A leak of one fd per
# shard or per epoch (>= 20 epochs a full run, thousands of shards) reads far past it.
WARMUP = 0.25  # share of the samples, from the start, that the trend leaves out
RSS_BOUND_MIB = 48  # allowed RSS trend of a rank with its workers over the run
FDS_BOUND = 8 * WORKERS  # allowed open-fd trend of a rank with its workers over the run (16: see above)


def tiny_shards(folder: Path, shards: int, classes: int = 10) -> Path:
    """`shards` tar shards of 16x16 PNGs in the shard format (docs/architecture.md) plus dataset.json; fast (the images
    are encoded once per class and the tars written directly). Returns the dataset.json path."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for c in range(classes):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (25 * c, 255 - 25 * c, 128)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    entries, key = [], 0
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with tarfile.open(folder / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(SAMPLES_PER_SHARD):
                label = key % classes
                meta = {"label": str(label), "src": f"{label}/{key}.png", "width": 16, "height": 16,
                        "sha256": hashlib.sha256(pngs[label]).hexdigest()}
                members = (("png", pngs[label]), ("cls", str(label).encode()), ("json", json.dumps(meta).encode()))
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                key += 1
        raw = (folder / name).read_bytes()
        entries.append({"name": name, "samples": SAMPLES_PER_SHARD, "bytes": len(raw),
                        "sha256": hashlib.sha256(raw).hexdigest()})
    manifest = {"format": "vitscale-shards/1", "classes": [str(c) for c in range(classes)],
                "splits": {"train": {"samples": key, "shards": entries}}}
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder / "dataset.json"


def _usage(proc) -> tuple[int, int]:
    """(RSS bytes, open fds) of a process and its children (the DataLoader workers)."""
    rss = fds = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            rss, fds = rss + p.memory_info().rss, fds + p.num_fds()
        except Exception:  # a worker between epochs may just have exited
            pass
    return rss, fds


def drive(data: str, out: str, seconds: float, interval: float) -> None:
    """One rank: iterate the stream for `seconds`, one JSON line of figures per `interval`."""
    import psutil

    from data_prep.stream import DataCfg, build_loader
    from runtime.dist import detect

    env = detect()
    loader = build_loader(DataCfg(path=data, workers=WORKERS), "train", train=True, dist_env=env, image_size=16,
                          micro_batch=MICRO_BATCH, seed=0, global_batch=MICRO_BATCH * env.world_size, device="cpu")
    me = psutil.Process()
    t0 = last = time.monotonic()
    n = 0
    with open(Path(out) / f"rank{env.rank}.jsonl", "w", buffering=1) as f:
        while time.monotonic() - t0 < seconds:
            for images, _ in loader:  # uint8 (B, 3, 16, 16)
                n += images.shape[0]
                now = time.monotonic()
                if now - last >= interval:
                    rss, fds = _usage(me)
                    f.write(json.dumps({"t": now - t0, "samples": n, "rate": n / (now - last), "rss": rss,
                                        "fds": fds, "epoch": loader.epoch}) + "\n")
                    n, last = 0, now
                if now - t0 >= seconds:
                    break
    loader.close()


def growth(rows: list[dict], key: str) -> tuple[float, float]:
    """(slope per second, growth over the run) of `key`: the least-squares line through the samples after the
    warm-up, times the run's length (the time of the last sample)."""
    judged = rows[max(1, round(len(rows) * WARMUP)):]
    slope = statistics.linear_regression([r["t"] for r in judged], [r[key] for r in judged]).slope
    return slope, slope * rows[-1]["t"]


def check_rank(rows: list[dict]) -> dict:
    """Flat memory, no fd growth and steady throughput for one rank's samples; returns its figures."""
    run_s = rows[-1]["t"]
    rss_slope, rss_growth = (x / 2**20 for x in growth(rows, "rss"))
    fds_slope, fds_growth = growth(rows, "fds")
    assert rss_growth < RSS_BOUND_MIB, (
        f"RSS trend {rss_growth:+.1f} MiB over the {run_s:.0f} s run ({60 * rss_slope:+.2f} MiB/min after the "
        f"warm-up; bound {RSS_BOUND_MIB} MiB)")
    fds = [r["fds"] for r in rows]
    assert fds_growth <= FDS_BOUND, (
        f"open fds trend {fds_growth:+.1f} over the {run_s:.0f} s run ({60 * fds_slope:+.2f}/min after the warm-up; "
        f"bound {FDS_BOUND}; samples {min(fds)}-{max(fds)})")
    median = statistics.median(r["rate"] for r in rows)
    late = [r["rate"] for r in rows[len(rows) // 2:]]
    # a slowdown that lasts (a leak, a stalled worker), not one slow interval: on a loaded 2-core machine a single
    # interval fell to 38 % of the median while the second half's median stayed at the median
    assert statistics.median(late) >= median / 2, (
        f"throughput fell to {statistics.median(late):.0f} samples/s over the second half (median of the run "
        f"{median:.0f}; slowest interval {min(late):.0f})")
    return {"rss_mib": round(statistics.median(r["rss"] for r in rows) / 2**20, 1),
            "rss_trend_mib": round(rss_growth, 1), "rss_bound_mib": RSS_BOUND_MIB, "fds_range": [min(fds), max(fds)],
            "fds_trend": round(fds_growth, 1), "fds_bound": FDS_BOUND, "run_s": round(run_s),
            "samples_per_s_median": round(median), "samples_per_s_min_late": round(min(late)),
            "epochs": rows[-1]["epoch"], "intervals": len(rows)}


@scenario("stream-load", "2 ranks x 2 workers stream many tiny shards for a sustained run: RSS flat, no fd leak, "
          "throughput steady", trials=1)
def stream_load(ctx: Ctx) -> Outcome:
    shards, seconds, interval = (2000, 600, 10.0) if ctx.full else (200, 20, 2.0)
    data = tiny_shards(ctx.work / "data", shards)
    out = ctx.work / "figures"
    out.mkdir()
    proc = run_torchrun(["-m", "tests.faults.stream_load", str(data), str(out), str(seconds), str(interval)],
                        nproc=2)
    log = proc.communicate(timeout=seconds + 300)[0]
    assert proc.returncode == 0, f"the stream driver failed:\n{log[-4000:]}"
    figures = {}
    for rank in (0, 1):
        rows = [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]
        assert len(rows) >= 8, f"rank {rank}: only {len(rows)} intervals recorded"
        figures[f"rank{rank}"] = check_rank(rows)
    rates = [f["samples_per_s_median"] for f in figures.values()]
    per_rank = "; ".join(
        f"{r}: RSS {f['rss_mib']:.0f} MiB (rank + workers), trend {f['rss_trend_mib']:+.1f} MiB (bound "
        f"{RSS_BOUND_MIB}); fds {f['fds_range'][0]}-{f['fds_range'][1]}, trend {f['fds_trend']:+.1f} (bound "
        f"{FDS_BOUND}); {f['intervals']} samples, {f['epochs']} epochs; slowest late interval "
        f"{f['samples_per_s_min_late'] / f['samples_per_s_median']:.0%} of the median" for r, f in figures.items())
    return Outcome(detail=f"{shards} shards, {seconds} s, {sum(rates)} samples/s over 2 ranks x {WORKERS} workers; "
                          f"{per_rank}", extra=figures)


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
