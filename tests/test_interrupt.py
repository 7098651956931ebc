"""Ctrl-C (SIGINT) during training: the first one stops every rank at the next agreed step after a checkpoint
(exit 130), as SIGTERM does; a second one, a second or more later, stops at once with one line and no
traceback. Ctrl-C from a terminal reaches the whole foreground process group: torchrun's agent (which
forwards it to the ranks again) and every rank."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_torchrun
from tests.pretrain_fixtures import train_args

CHECK_EVERY = 20  # checkpoint.signal_check_every
STOPPED = re.compile(r"\[rank (\d)\] preempted \(SIGINT\): checkpoint saved at step (\d+)")


def _read_until(proc: subprocess.Popen, text: str, out: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        out.append(line)
        if text in line:
            return
        assert time.monotonic() < deadline, "".join(out)[-3000:]
    raise AssertionError(f"ended before {text!r}:\n{''.join(out)[-3000:]}")


def test_ctrl_c_under_torchrun_checkpoints_every_rank(digits_shards: Path, tmp_path: Path, ctrl_c_default) -> None:
    run = tmp_path / "run"
    proc = run_torchrun(train_args(digits_shards, run, "train.steps=2000", "checkpoint.every=0", "eval.every=0",
                                   "log.every=5", f"checkpoint.signal_check_every={CHECK_EVERY}"), session=True)
    out: list[str] = []
    try:
        _read_until(proc, "step 25/2000", out)
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: agent and ranks alike
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(out) + rest
    stops = {int(rank): int(step) for rank, step in STOPPED.findall(text)}
    assert sorted(stops) == [0, 1] and len(set(stops.values())) == 1, text[-3000:]
    step = stops[0]
    assert step % CHECK_EVERY == 0 and 25 <= step < 2000, step
    assert (run / "checkpoints" / "latest").read_text().strip() == f"global_step{step}"
    assert proc.returncode != 0, text[-2000:]  # an interrupted job does not report success
    assert not re.search(r"\[rank\d\]: Traceback", text), text[-3000:]  # the ranks stopped, not crashed
    assert text.count("Ctrl-C: stopping after a checkpoint") == 1  # rank 0 says it once, for both deliveries


def test_a_second_ctrl_c_stops_at_once(digits_shards: Path, tmp_path: Path, ctrl_c_default) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, *train_args(digits_shards, run, "train.steps=2000", "checkpoint.every=0", "eval.every=0",
                                       "log.every=5", "checkpoint.signal_check_every=100000")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    try:
        _read_until(proc, "step 10/2000", out)
        proc.send_signal(signal.SIGINT)
        _read_until(proc, "Ctrl-C again to stop now", out)
        time.sleep(1.5)  # past the window in which a second delivery counts as the same keypress
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    text = "".join(out) + rest
    assert proc.returncode == 130, text[-3000:]
    assert text.rstrip().endswith("interrupted (Ctrl-C); a training run resumes from its last checkpoint when the "
                                  "same command is rerun"), text[-2000:]
    assert "Traceback" not in text and not (run / "checkpoints" / "latest").exists(), text[-3000:]


def test_ctrl_c_ignored_at_start_stays_ignored_and_handlers_are_put_back() -> None:
    from trainer.preempt import Preemption

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as for `cmd &` in a script
        p = Preemption()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == p._handle
        p.restore()
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        p = Preemption()
        p._handle(signal.SIGINT, None)  # the first Ctrl-C: a flag, no exception
        p._handle(signal.SIGINT, None)  # the same keypress delivered twice (terminal + torchrun): still none
        assert p.flag and p.exit_code == 130
        p._first_ctrl_c -= 2  # a second press, later
        with pytest.raises(KeyboardInterrupt):
            p._handle(signal.SIGINT, None)
        p.restore()
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        for s, h in before.items():
            signal.signal(s, h)
