"""Loader workers forked right after collectives: how often the fork deadlocks, with and without the settle.

A trainer forks an eval loader's workers just after the step's logging collectives. On CPython 3.11 before
3.11.10 (gh-112275) a child forked while a process-group thread holds the interpreter's thread-state lock
deadlocks before its first line; the stream forks inside `forking_workers()`, which gives that thread
FORK_SETTLE_S to finish first (data_prep/stream_worker.py). Each rank of a 2-process gloo job repeats: three
"micro-steps" (a batch from a persistent loader worker + an all-reduce), then forks a fresh persistent loader's
worker right after the last all-reduce and reads its batches, as an eval does, then the eval's all-reduce. A
worker that delivers nothing within --timeout seconds is counted as hung (and killed).

- ours: the fork inside `forking_workers()` (settle + preemption signals blocked), as the stream forks.
- peer: the same fork with the preemption signals blocked only (the fork as it was before the settle).

--jobs jobs of each run at the same time, for --seconds each, so both see the same load. The race needs the two
threads on two cores at the same instant: on this 2-core machine 1 job of each hangs the peer about once per
1,000 forks, 2 of each (8 ranks on 2 cores) hardly ever.

Usage: python bench/fork_settle.py [--seconds 420] [--jobs 1] [--timeout 20]
Prints each job's forks and hangs; the hangs per 1,000 forks of both come last.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.stream_worker import forking_workers, preemption_signals_blocked  # noqa: E402


class _Batches(IterableDataset):
    """`n` (or endless) uint8 micro-batches of 8 32-px images."""

    def __init__(self, n: int | None = None):
        super().__init__()
        self.n = n

    def __iter__(self):
        for i in itertools.count() if self.n is None else range(self.n):
            yield torch.full((8, 3, 32, 32), i % 256, dtype=torch.uint8)


def rank_loop(variant: str, seconds: float, timeout_s: float) -> dict:
    """One rank's forks and hung forks in `seconds` (every rank stops at the same iteration)."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3 * timeout_s + 60))
    fork = forking_workers if variant == "ours" else preemption_signals_blocked
    train = DataLoader(_Batches(4), batch_size=None, num_workers=1, persistent_workers=True)
    micro_batches = iter(train)
    forks = hangs = 0
    deadline = time.monotonic() + seconds
    while True:
        for _ in range(3):  # micro-steps: a batch (a new pass every 4, as epochs go), then an all-reduce
            try:
                next(micro_batches)
            except StopIteration:
                micro_batches = iter(train)
            grads = torch.ones(100_000)
            dist.all_reduce(grads)
        val = DataLoader(_Batches(4), batch_size=None, num_workers=1, persistent_workers=True, timeout=timeout_s)
        with fork():
            batches = iter(val)
        forks += 1
        try:
            for _ in batches:
                pass
        except RuntimeError:  # "DataLoader timed out": the forked worker never started
            hangs += 1
            for w in batches._workers:  # stuck with SIGTERM blocked (it never ran its init): only SIGKILL ends it
                w.kill()
        del batches, val
        dist.all_reduce(torch.ones(4, dtype=torch.float64))  # the eval's all-reduce
        stop = torch.tensor([float(time.monotonic() > deadline)])
        dist.all_reduce(stop)  # every rank stops at the same iteration
        if stop.item():
            break
    dist.destroy_process_group()
    return {"variant": variant, "rank": int(os.environ["RANK"]), "forks": forks, "hangs": hangs}


def _job(variant: str, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).resolve()), "--variant", variant,
           "--seconds", str(args.seconds), "--timeout", str(args.timeout)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=420.0, help="how long each job forks")
    p.add_argument("--jobs", type=int, default=1, help="jobs of each variant, all at the same time")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds after which a forked worker counts as hung")
    p.add_argument("--variant", choices=("ours", "peer"), help=argparse.SUPPRESS)  # a rank of a job
    args = p.parse_args()
    if args.variant:
        print("RESULT", json.dumps(rank_loop(args.variant, args.seconds, args.timeout)), flush=True)
        return 0
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs; {args.jobs} jobs "
          f"of each variant for {args.seconds:.0f} s, a fork hung after {args.timeout:.0f} s")
    jobs = [(v, _job(v, args)) for _ in range(args.jobs) for v in ("ours", "peer")]
    totals = {"ours": [0, 0], "peer": [0, 0]}
    failed = 0
    for variant, proc in jobs:
        out, _ = proc.communicate()
        results = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or len(results) != 2:
            failed += 1
            print(f"{variant}: job failed (rc {proc.returncode}):\n{out[-2000:]}")
            continue
        forks, hangs = sum(r["forks"] for r in results), sum(r["hangs"] for r in results)
        totals[variant][0] += forks
        totals[variant][1] += hangs
        print(f"{variant}: {forks} forks, {hangs} hung")
    rate = {v: 1000 * h / max(f, 1) for v, (f, h) in totals.items()}
    print(f"ratio: hung forks per 1,000: ours {rate['ours']:.2f} ({totals['ours'][1]} of {totals['ours'][0]}), "
          f"peer {rate['peer']:.2f} ({totals['peer'][1]} of {totals['peer'][0]})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
