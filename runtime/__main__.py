"""`python -m runtime dist-check`: start the process group under any launcher and prove it works.

Each rank prints one JSON line (its rank, world, node, launcher and the all-reduced rank sum),
then all ranks meet at a barrier and tear down. A smoke test for a new cluster or launcher.
`--hold S` keeps the group up for S seconds first (a barrier every second, each bounded by the
process-group timeout), so that failure handling can be tried by killing a node mid-run.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import torch
import torch.distributed as torch_dist

from runtime.argtypes import number, seconds
from runtime.dist import barrier, detect, init_distributed, shutdown
from runtime.io import say


def hold(seconds: float, rank: int) -> None:
    """Meet the other ranks at a barrier every second for `seconds`; a lost rank fails a barrier."""
    say(json.dumps({"rank": rank, "holding_s": seconds}))
    deadline = time.monotonic() + seconds
    step = 0
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        try:
            barrier()
        except Exception as e:  # a peer died or the link dropped: say so, then fail the job
            say(f"dist-check: rank {rank} lost a peer at barrier {step}: {type(e).__name__}: {e}", sys.stderr)
            raise SystemExit(1) from None
        step += 1


def dist_check(timeout_s: float, hold_s: float = 0.0) -> dict:
    """Init, all-reduce the ranks, (hold), barrier, teardown; return what this rank saw."""
    env = init_distributed(detect(), timeout_s=timeout_s)
    if hold_s > 0:
        hold(hold_s, env.rank)
    total = torch.tensor([float(env.rank)])
    if torch_dist.is_initialized():
        if torch_dist.get_backend() == "nccl":
            total = total.cuda()
        torch_dist.all_reduce(total)
    barrier()
    report = {
        "rank": env.rank,
        "world_size": env.world_size,
        "local_rank": env.local_rank,
        "node_rank": env.node_rank,
        "num_nodes": env.num_nodes,
        "launcher": env.launcher,
        "host": socket.gethostname(),
        "rank_sum": int(total.item()),
        "backend": torch_dist.get_backend() if torch_dist.is_initialized() else None,
    }
    shutdown()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    c = sub.add_parser("dist-check", help="init the process group, all-reduce, barrier, teardown")
    c.add_argument("--timeout", type=number(0, strict=True), default=60.0, help="collective timeout, seconds")
    c.add_argument("--hold", type=seconds, default=0.0, metavar="SECONDS",
                   help="keep the group up this long (a barrier each second) before the check")
    args = p.parse_args(argv)
    report = dist_check(args.timeout, args.hold)
    say(json.dumps(report))  # one write: the ranks share the console pipe
    expected = report["world_size"] * (report["world_size"] - 1) // 2
    return 0 if report["rank_sum"] == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
