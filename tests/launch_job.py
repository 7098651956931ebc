"""A small distributed job that checkpoints on SIGTERM/SIGUSR1 and resumes: the launch requeue tests' stand-in
for the trainer. `python -m tests.launch_job --state DIR --steps N`: every rank meets at a barrier each
step; on a signal rank 0 saves the step to DIR/state.json (atomically) and every rank exits 0; a new run
resumes from that step. Prints one JSON line per step and event.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from runtime.dist import barrier, detect, init_distributed, shutdown
from runtime.io import atomic_write_json


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--state", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--step-s", type=float, default=0.5)
    args = p.parse_args()
    stop = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda s, _f: stop.append(s))
    env = init_distributed(detect(), timeout_s=30)
    state = Path(args.state) / "state.json"
    step = json.loads(state.read_text())["step"] if state.exists() else 0
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    say = lambda **kw: print(json.dumps({"rank": env.rank, **kw}), flush=True)  # noqa: E731
    if step:
        say(resumed_from=step, restart=restart)
    while step < args.steps:
        if not stop:
            time.sleep(args.step_s)
            try:
                barrier()
                step += 1
                say(step=step)
                continue
            except Exception:
                if not stop:  # a peer failed without being asked to stop
                    raise
        if env.rank == 0:  # stop requested: checkpoint the last completed step and leave
            atomic_write_json(state, {"step": step})
        say(checkpointed=step, signal=int(stop[0]))
        return 0
    say(done=step, world=env.world_size)
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
