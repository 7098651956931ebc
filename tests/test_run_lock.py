"""The run dir. One job at a time (runtime/lock.py): a second `train` into a dir in use is refused, on every rank,
with one line naming the holder; the lock is its process's alone and ends with it (kill -9 included, forked
children aside), so a resumed job never meets a stale lock. And a run.dir that cannot be a folder this process
writes in is refused before anything starts."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.lock import LOCK_NAME, DirLock
from tests.conftest import ROOT
from tests.stage_fixtures import STAGES, CliServer, files, train, train_args, write_init

# A holder in another process: takes the lock, forks a child that outlives it (as a loader worker could),
# reports both pids, then waits to be killed.
HOLDER = """
import os, sys, time
from runtime.lock import DirLock
lock = DirLock(sys.argv[1])
assert lock.acquire() is None
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(os.getpid(), child, flush=True)
time.sleep(120)
"""
PROBE = "import sys; from runtime.lock import DirLock; print(DirLock(sys.argv[1]).acquire())"


def test_the_lock_is_its_processs_and_ends_with_it(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    child = None
    try:
        pid, child = map(int, holder.stdout.readline().split())
        ours = DirLock(tmp_path)
        held_by = ours.acquire()
        assert held_by is not None and held_by.startswith(f"pid {pid} on "), held_by
        holder.kill()  # kill -9: no release ran; the forked child still has the file open
        holder.wait()
        assert ours.acquire() is None and ours.supported
        # held by this process now: another one is refused, told who holds it, until it is released (the file is
        # read in other processes only: closing any descriptor of it would end this process's POSIX lock)
        probe = [sys.executable, "-c", PROBE, str(tmp_path)]
        ask = lambda: subprocess.run(probe, cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
        assert ask().startswith(f"pid {os.getpid()} on ")
        ours.release()
        assert ask() == "None"
    finally:
        holder.kill()
        if child:
            os.kill(child, signal.SIGKILL)


def test_a_filesystem_without_locks_refuses_nothing(tmp_path: Path, monkeypatch) -> None:
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr("runtime.lock.fcntl.lockf", no_locks)
    lock = DirLock(tmp_path / "run")
    assert lock.acquire() is None and not lock.supported


@pytest.mark.parametrize("stage", STAGES)
def test_train_into_a_dir_in_use_is_refused(stage: str, digits_shards: Path, cli_server: CliServer,
                                            tmp_path: Path) -> None:
    run_dir, init = tmp_path / "run", write_init(tmp_path / "init.safetensors")
    lock = DirLock(run_dir)  # this process is "the other job"
    assert lock.acquire() is None
    try:
        before = files(run_dir)
        proc = cli_server.run(stage, *train_args(stage, digits_shards, run_dir, init)[2:])
        lines = proc.stderr.splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith(f"error: run.dir {run_dir} is in use by another job (pid {os.getpid()} on ")
        assert files(run_dir) == before, "the refused job wrote into the dir"
    finally:
        lock.release()


def test_every_rank_learns_the_dir_is_in_use(digits_shards: Path, tmp_path: Path) -> None:
    """Only rank 0 asks the lock; the answer reaches rank 1 too, which stops with the same line (no hang)."""
    run_dir = tmp_path / "run"
    lock = DirLock(run_dir)
    assert lock.acquire() is None
    try:
        rc, out = train("pretrain", digits_shards, run_dir, tmp_path / "unused", timeout=120)
    finally:
        lock.release()
    refused = [x for x in out.splitlines() if "is in use by another job" in x]
    assert rc != 0 and len(refused) == 2 and all(x.startswith("error: run.dir") for x in refused), out[-3000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME], "the refused job wrote into the dir"


def test_a_run_dir_that_cannot_be_a_writable_folder_is_refused(tmp_path: Path, monkeypatch) -> None:
    from runtime.config import ConfigError
    from trainer.run import check_run_dir

    (tmp_path / "a.txt").write_text("x")
    check_run_dir(tmp_path / "new" / "run")  # made later, under a folder we can write
    for bad, named in ((tmp_path / "a.txt", "a.txt is a file"), (tmp_path / "a.txt" / "run", "a.txt is a file")):
        with pytest.raises(ConfigError, match=f"run.dir {bad}: .*{named}, not a folder"):
            check_run_dir(bad)
    monkeypatch.setattr("runtime.io.os.access", lambda path, mode: False)  # as a user without write permission
    with pytest.raises(ConfigError, match=f"no permission to write in {tmp_path}"):
        check_run_dir(tmp_path / "run")
