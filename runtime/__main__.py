"""`python -m runtime dist-check`: start the process group under any launcher and prove it works.

Each rank prints one JSON line (its rank, world, node, launcher and the all-reduced rank sum),
then all ranks meet at a barrier and tear down. A smoke test for a new cluster or launcher.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

import torch
import torch.distributed as torch_dist

from runtime.dist import barrier, detect, init_distributed, shutdown


def dist_check(timeout_s: float) -> dict:
    """Init, all-reduce the ranks, barrier, teardown; return what this rank saw."""
    env = init_distributed(detect(), timeout_s=timeout_s)
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
    c.add_argument("--timeout", type=float, default=60.0, help="collective timeout, seconds")
    args = p.parse_args(argv)
    report = dist_check(args.timeout)
    # One write per line: ranks share the console pipe, and a single short write is never interleaved.
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()
    expected = report["world_size"] * (report["world_size"] - 1) // 2
    return 0 if report["rank_sum"] == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
