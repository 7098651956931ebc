"""End to end on real JPEGs: `pretrain train` streaming shards of real photos, decoded in the CPU workers and with
decode="gpu", against the same trainer fed synthetic batches (only the loader replaced), in the same run.

    python bench/end_to_end.py                  # one GPU: vit_l16_in21k, 200 steps of 128, workers = cores
    python bench/end_to_end.py --recipe debug_cpu --steps 8 --log-every 2 --images 96 --modes synthetic cpu
                                                # CPU check: the same code path in seconds

The shards: crops of the two bundled photos (data_prep.examples) resized to 500x375 or 375x500 (ImageNet's
typical size), JPEG quality 90, labels spread over `--classes` classes, written by data_prep's own writer
(`--images` of them; the trainer goes over them as often as its steps need). Each run is a fresh process of
the trainer's own code (`trainer.run.train` with the recipe's model, ZeRO, compile and optimizer) at
`--accum` micro-batches per step, with no eval and no checkpoint writing (neither is timed). Its img/s and
data-wait share are the trainer's own meter over the steps after the first `--skip` log windows (compile,
warm-up). Target (issue #15): each real-data run >= 0.95x the synthetic run's img/s; the ratios come last.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from data_prep import write_shards
from data_prep.examples import photo_crops
from data_prep.pool import worker_pool

MODES = ("synthetic", "cpu", "gpu")


def _write_images(job: tuple[Path, int, int, int]) -> list[tuple[str, str]]:
    """(folder, start, count, classes): `count` photo crops (3 of 4 landscape 500x375, 1 of 4 portrait) as JPEGs;
    returns their (path, label) rows."""
    folder, start, count, classes = job
    landscape, portrait = photo_crops(count, size=(500, 375), seed=start), photo_crops(count, (375, 500), start + 1)
    rows = []
    for k in range(start, start + count):
        _, img = next(portrait if k % 4 == 3 else landscape)
        path = folder / f"{k:07d}.jpg"
        img.save(path, quality=90)
        rows.append((str(path), f"c{k % classes:04d}"))
    return rows


def make_shards(out: Path, images: int, classes: int, workers: int) -> Path:
    """Real-photo JPEG shards in `out` (kept: a second run reuses them); returns its dataset.json."""
    manifest = out / "dataset.json"
    if manifest.exists():
        return manifest
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        chunk = -(-images // workers)
        jobs = [(Path(tmp), s, min(chunk, images - s), classes) for s in range(0, images, chunk)]
        with worker_pool(workers) as (imap, _):
            rows = [r for part in imap(_write_images, jobs) for r in part]
        with open(Path(tmp) / "list.csv", "w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows])
        # 64 shards, whoever writes them: every loader reader (up to 64) needs shards of its own
        write_shards(Path(tmp) / "list.csv", out, samples_per_shard=max(1, images // 64), workers=workers)
    return manifest


class SyntheticStream:
    """The train stream's interface over one fixed uint8 batch (pinned on a GPU machine): the trainer with only
    its data source replaced. Never ends an epoch."""

    def __init__(self, micro_batch: int, image_hw: tuple[int, int], num_classes: int, steps_per_epoch: int):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (micro_batch, 3, *image_hw), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, num_classes, (micro_batch,), generator=g)
        if torch.cuda.is_available():
            self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        self.keys = [f"synthetic{i}" for i in range(micro_batch)]
        self.steps_per_epoch, self.epoch, self.position = steps_per_epoch, 0, 1
        self.stats: dict = {"by_reason": {}}

    def __iter__(self):
        while True:
            yield self.images, self.labels, self.keys

    def state_dict(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def run_one(args) -> None:
    """One trainer run in this process (`--one MODE`); prints `RESULT {json}` with its meter's windows."""
    import runtime.meters
    import trainer.loop
    import trainer.run
    from pretrain.config import load_pretrain_config
    from pretrain.train import train

    windows = []
    summary = runtime.meters.ThroughputMeter.summary

    def recorded(self, reset: bool = True):
        out = summary(self, reset)
        if reset:  # a log window: the monitor reads (and resets) the meter once per `log.every` steps
            windows.append(out)
        return out

    runtime.meters.ThroughputMeter.summary = recorded
    trainer.loop.Loop.save = lambda self: None  # checkpoints are not what is timed here
    if args.one == "synthetic":
        trainer.run.build_loader = lambda data, split, *, micro_batch, image_size, **_: SyntheticStream(
            micro_batch, image_size, args.classes, steps_per_epoch=10**6)
    decode = "gpu" if args.one == "gpu" else "cpu"
    overrides = [f"data.path={args.data}", "data.val_split=null", f"data.decode={decode}",
                 f"data.workers={args.workers}", f"run.dir={args.run_dir}/{args.one}", f"train.steps={args.steps}",
                 "train.epochs=null", f"log.every={args.log_every}", "log.trackers=[]",
                 *([f"train.micro_batch={args.micro_batch}"] if args.micro_batch else []), *args.overrides]
    cfg = load_pretrain_config(args.recipe, overrides)
    steps = dataclasses.replace(cfg.train, global_batch=cfg.train.micro_batch * args.accum)
    cfg = dataclasses.replace(cfg, train=steps)
    train(cfg)
    timed = windows[args.skip:]
    if not timed:
        raise SystemExit(f"only {len(windows)} log windows: raise --steps or lower --skip")
    seconds = [w["step_time"] * args.log_every for w in timed]
    total = sum(seconds)
    print("RESULT " + json.dumps({
        "mode": args.one, "img_per_s": sum(w["img_per_s"] * s for w, s in zip(timed, seconds, strict=True)) / total,
        "data_wait": sum(w["data_wait_share"] * s for w, s in zip(timed, seconds, strict=True)) / total,
        "timed_steps": len(timed) * args.log_every, "micro_batch": cfg.train.micro_batch,
        "global_batch": cfg.train.global_batch}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="vit_l16_in21k")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's")
    p.add_argument("--log-every", type=int, default=20, help="steps per meter window")
    p.add_argument("--skip", type=int, default=2, help="first windows left out (compile, warm-up)")
    p.add_argument("--images", type=int, default=8192, help="JPEGs in the shards")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="loader workers (and writers)")
    p.add_argument("--data", default=None, help="shard folder (made if missing; default: a temporary one)")
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # a child run
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. zero.stage=1")
    args = p.parse_args()
    if args.one:
        run_one(args)
        return
    with tempfile.TemporaryDirectory(prefix="vitscale-e2e-") as tmp:
        data = Path(args.data or Path(tmp) / "shards")
        manifest = make_shards(data, args.images, args.classes, args.workers)
        print(f"shards: {manifest} ({args.images} real-photo JPEGs, 500x375), {args.workers} workers", flush=True)
        results = {}
        for mode in args.modes:
            results[mode] = child(args, mode, manifest, Path(tmp) / "runs")
    report(args, results)


def child(args, mode: str, manifest: Path, run_dir: Path) -> dict:
    """Run `--one mode` in a fresh process (its own CUDA context, compile and loader workers); its result."""
    cmd = [sys.executable, __file__, "--one", mode, "--data", str(manifest), "--run-dir", str(run_dir),
           "--recipe", args.recipe, "--steps", str(args.steps), "--accum", str(args.accum),
           "--log-every", str(args.log_every), "--skip", str(args.skip), "--classes", str(args.classes),
           "--workers", str(args.workers), *(["--micro-batch", str(args.micro_batch)] if args.micro_batch else []),
           *args.overrides]
    print(f"=== {mode}", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = proc.stdout.splitlines()
    print("\n".join(line for line in lines[-8:] if not line.startswith("RESULT ")), flush=True)
    found = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
    if proc.returncode or not found:
        print("\n".join(lines[-40:]))
        raise SystemExit(f"the {mode} run failed (exit {proc.returncode})")
    r = found[0]  # at once, so that a run cut short by a time limit still reports the modes it finished
    print(f"{mode} decode: {r['img_per_s']:.1f} img/s, data-wait {r['data_wait']:.2%}", flush=True)
    return r


def report(args, results: dict) -> None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.recipe}, {args.accum} micro-batch(es) per step, {args.workers} loader workers, {name}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['img_per_s']:9.1f} img/s  data-wait {r['data_wait']:.2%}  "
              f"({r['timed_steps']} steps timed, micro-batch {r['micro_batch']})")
    if "synthetic" in results:
        base = results["synthetic"]["img_per_s"]
        for mode in (m for m in results if m != "synthetic"):
            print(f"ratio {mode} decode / synthetic: {results[mode]['img_per_s'] / base:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
