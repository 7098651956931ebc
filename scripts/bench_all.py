"""`make bench`: run every benchmark in bench/ with settings this machine can run, then a table of their ratios.

    python scripts/bench_all.py            # CPU: short settings; on a GPU machine: each benchmark's GPU defaults
    python scripts/bench_all.py --only loader train_throughput

Each benchmark runs our code and a peer in the same run and prints its ratio(s) last; those lines are
collected. Figures on a shared or CPU-only machine are noisy and say nothing about GPUs: see
docs/performance.md for how each one is meant to be read.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> (CPU settings: seconds to a minute or two each, GPU settings). The GPU rows are docs/performance.md's.
SETTINGS = {
    "shard_write": (["--n", "200", "--repeats", "1"], ["--n", "1000", "--repeats", "3"]),
    "near_dup": (["--n", "300", "--lookups", "500"], ["--n", "1000"]),
    "loader": (["--images", "128", "--rounds", "1"], ["--gpu-decode", "--images", "4096", "--batch", "256"]),
    "train_throughput": (["--recipe", "debug_cpu", "--accum", "2", "--steps", "5", "--warmup", "2",
                          "train.micro_batch=32"], ["--recipe", "vit_l16_in21k", "--accum", "4"]),
    "fewshot_cost": (["--variant", "debug", "--image-size", "224", "--micro-batch", "8", "--datasets", "pets"],
                     ["--variant", "L/16", "--micro-batch", "32", "--reps", "5"]),
    "finetune_throughput": (["--variant", "debug", "--image-size", "32", "--micro-batch", "8", "--steps", "4",
                             "--warmup", "1"], []),
    "end_to_end": (["--recipe", "debug_cpu", "--steps", "8", "--log-every", "2", "--skip", "1", "--images", "96",
                    "--classes", "10", "--workers", "2"], []),
    "fp8_trial": (["--recipes", "debug_cpu", "--loss-steps", "40", "--rate-steps", "4", "--warmup", "2",
                   "train.micro_batch=16"], []),
    # hangs are rare (~2 per 1,000 plain forks): the short run is a smoke test, the figure in
    # docs/architecture.md from its defaults (420 s)
    "fork_settle": (["--seconds", "30"], ["--seconds", "30"]),
    # a check, not a benchmark: its verdict line is collected with the ratios
    "dropout_masks": (["--variant", "debug", "--image-size", "32", "--device", "cpu", "--no-compile"], []),
}
NOT_HERE = {"faults"}  # the fault suite is `make faults`: tens of minutes, a reliability table, not a ratio
RATIO_LINE = re.compile(r"ratio|ours/|target|verdict|^check ", re.IGNORECASE)


def run(name: str, args: list[str]) -> tuple[int, list[str], float]:
    """Run one benchmark with its output shown as it comes; return its exit code, ratio lines and seconds."""
    cmd = [sys.executable, f"bench/{name}.py", *args]
    print(f"\n== {name}\n$ {shlex.join(cmd)}", flush=True)
    start, ratios = time.perf_counter(), []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if RATIO_LINE.search(line):
                ratios.append(line.strip())
    return proc.returncode, ratios, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="benchmark names (files in bench/ without .py)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="GPU settings (default: when a GPU is visible)")
    args = p.parse_args(argv)
    found = sorted(f.stem for f in (ROOT / "bench").glob("*.py") if f.stem not in NOT_HERE)
    missing = [n for n in found if n not in SETTINGS]
    if missing:
        raise SystemExit(f"no settings for bench/{missing[0]}.py: add its CPU and GPU arguments to SETTINGS in "
                         f"{Path(__file__).name}")
    if args.gpu is None:
        import torch

        args.gpu = torch.cuda.is_available()
    rows, failed = [], 0
    for name in args.only or found:
        rc, ratios, secs = run(name, SETTINGS[name][1 if args.gpu else 0])
        failed += rc != 0
        rows += [(name, line, secs) for line in (ratios if rc == 0 else [f"FAILED (exit {rc})"])]
    print(f"\n{'benchmark':<22}{'seconds':>8}  ratio ({'GPU' if args.gpu else 'CPU'} settings; details above)")
    for name, line, secs in rows:
        print(f"{name:<22}{secs:8.0f}  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
