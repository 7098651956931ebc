"""Helpers shared by the shard-writer tests and the fault scenarios: run the CLI in its own process group and
read an output folder back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of an output folder (not the bookkeeping under .parts) -> its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def data_prep_cli(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`python -m data_prep ...` in its own process group (so a kill reaches its workers too)."""
    return subprocess.Popen([sys.executable, "-m", "data_prep", *args, "--no-progress"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_after_shards(proc: subprocess.Popen, out: Path, k: int, sig: int = signal.SIGKILL) -> None:
    """Send `sig` (SIGKILL; SIGINT: a terminal's Ctrl-C) to the process group of a running `data_prep write` once
    its plan exists and `k` shards are done, and wait for it to end."""

    receipts, deadline = out / ".parts" / "shards", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / ".parts" / "plan.json").exists() and receipts.exists() and \
                sum(not p.name.startswith(".") for p in receipts.iterdir()) >= k:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the write ended before it could be killed:\n{proc.communicate()[0]}"
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
