"""The stream's DataLoader workers end with their owner, and only then.

They ignore SIGTERM (a preemption signal is the training process's to handle, and must not kill them before
its checkpoint), so nothing but the loader itself can end them: on close(), when it is garbage-collected,
and at interpreter exit, where multiprocessing would otherwise wait on them forever.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from data_prep.stream import DataCfg, build_loader
from runtime.dist import DistEnv
from tests.stream_fixtures import write_dataset

ROOT = Path(__file__).resolve().parents[1]
EXIT_BOUND_S = 60  # the whole script, torch import included (seconds when it works; forever when it does not)

# A user's script: build a 2-worker loader, take a few batches, get a SIGTERM sent to the whole process group
# (a trainer's handler only sets a flag; the workers must live on to feed the batches before the checkpoint),
# take more, and return from main without close(). "kept": the loader outlives main in a reference cycle and a
# module global, so only the exit can end its workers (and its decode thread with decode="gpu"); "local": it dies
# with main's frame.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading, time
    import psutil
    from data_prep.stream import DataCfg, build_loader
    from runtime.dist import DistEnv

    def main(path, mode, decode):
        flagged = []
        signal.signal(signal.SIGTERM, lambda signum, frame: flagged.append(signum))
        loader = build_loader(DataCfg(path=path, workers=2, decode=decode), "train", train=True, dist_env=DistEnv(),
                              image_size=16, micro_batch=4, seed=0, global_batch=4, device="cpu")
        batches = iter(loader)
        for _ in range(2):
            next(batches)
        workers = [p.pid for p in psutil.Process().children()]
        print("workers", *workers, flush=True)
        os.killpg(0, signal.SIGTERM)
        time.sleep(1.0)
        assert flagged == [signal.SIGTERM], flagged
        assert all(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers)
        for _ in range(3):
            next(batches)  # the "checkpoint" still gets its batches
        if mode == "kept":
            global KEPT
            holder = {"loader": loader, "batches": batches}
            holder["self"] = holder
            KEPT = holder
        print("decode threads", sum(t.name == "vitscale-gpu-decode" for t in threading.enumerate()), flush=True)
        print("returning", flush=True)

    main(*sys.argv[1:4])
""")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("lifetime") / "ds", {"train": [8, 8, 8, 8]})


@pytest.mark.parametrize(("mode", "decode"), [("kept", "cpu"), ("local", "cpu"), ("kept", "gpu")])
def test_unclosed_loader_lets_its_script_exit(data: Path, tmp_path: Path, mode: str, decode: str) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # its own session: the script's SIGTERM to its process group must not reach pytest
    proc = subprocess.Popen([sys.executable, str(script), str(data), mode, decode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    t0 = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our script and its workers, which ignore SIGTERM
        out, _ = proc.communicate()
        pytest.fail(f"the script did not exit within {EXIT_BOUND_S} s:\n{out[-3000:]}")
    took = time.monotonic() - t0
    assert proc.returncode == 0, out[-3000:]
    assert "returning" in out, out[-3000:]  # the workers survived the SIGTERM and kept delivering
    assert f"decode threads {int(decode == 'gpu')}" in out, out[-3000:]
    workers = [int(p) for line in out.splitlines() if line.startswith("workers ") for p in line.split()[1:]]
    assert len(workers) == 2, out[-3000:]
    # the script has been reaped, so its workers were ended (and joined) before it exited, not orphaned
    assert not [p for p in workers if _alive(p)], f"workers still running after the script exited ({took:.0f} s)"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def _loader(data: Path):
    return build_loader(DataCfg(path=str(data), workers=2), "train", train=True, dist_env=DistEnv(), image_size=16,
                        micro_batch=4, seed=0, global_batch=4, with_keys=True, device="cpu")


def test_collected_loader_stops_its_workers(data: Path) -> None:
    before = _children()
    ld = _loader(data)
    batches = iter(ld)
    for _ in range(3):
        next(batches)
    workers = sorted(_children() - before)
    assert len(workers) == 2
    holder: dict = {"loader": ld, "batches": batches}
    holder["self"] = holder  # only the cycle collector can free it
    del ld, batches, holder
    assert all(_alive(p) for p in workers)
    gc.collect()
    assert not _wait_gone(workers, 15), "the workers outlived their collected loader"


def test_close_ends_the_pass_and_the_workers_and_the_loader_can_go_on(data: Path) -> None:
    ref = [keys for _, _, keys in _loader(data)]  # one epoch of 8 micro-batches
    before = _children()
    ld = _loader(data)
    batches = iter(ld)
    head = [next(batches)[2] for _ in range(3)]
    workers = sorted(_children() - before)
    ld.close()
    assert not [p for p in workers if _alive(p)], "close() returned with workers still running"
    assert next(batches, None) is None  # the closed pass ends, it does not read on
    assert head + [keys for _, _, keys in ld] == ref  # new workers resume from the position
    ld.close()


def test_a_new_pass_closes_the_abandoned_one(data: Path) -> None:
    ld = _loader(data)
    old = iter(ld)
    next(old)
    state = ld.state_dict()
    fresh = iter(ld)  # the abandoned pass must not read the new pass's batches or move the position under it
    assert next(old, None) is None and ld.state_dict() == state
    assert len(list(fresh)) == len(ld) - 1
    ld.close()


def test_sigterm_to_the_workers_does_not_stop_the_stream(data: Path) -> None:
    before = _children()
    ld = _loader(data)
    batches = iter(ld)
    next(batches)
    workers = sorted(_children() - before)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert len(list(batches)) == len(ld) - 1  # the whole epoch, from the same workers
    assert all(_alive(p) for p in workers)
    ld.close()


def _slow_starting_worker(ready) -> None:
    """A worker whose `worker_init_fn` runs late: a SIGTERM lands before it ignores the signal."""
    from data_prep.stream_worker import ignore_preemption_signals

    ready.set()
    time.sleep(1.0)  # the SIGTERM arrives here, before the init (blocked since the fork, so still pending)
    ignore_preemption_signals()  # ... and is dropped here
    time.sleep(0.2)


@pytest.mark.parametrize("blocked", [True, False])
def test_a_sigterm_before_the_worker_init_does_not_kill_it(blocked: bool) -> None:
    """The window the test above can hit by chance, made certain: a worker forked inside
    `preemption_signals_blocked` survives a SIGTERM sent before its init ran; one forked outside dies of it
    (which left the loader waiting on a dead worker for ever)."""
    import contextlib
    import multiprocessing

    from data_prep.stream_worker import preemption_signals_blocked

    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    with preemption_signals_blocked() if blocked else contextlib.nullcontext():
        proc = ctx.Process(target=_slow_starting_worker, args=(ready,))
        proc.start()
    assert ready.wait(30)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(30)
    assert proc.exitcode == (0 if blocked else -signal.SIGTERM)
    assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}


def test_global_batch_is_for_training_only(data: Path) -> None:
    cfg = DataCfg(path=str(data), workers=0)
    common = dict(dist_env=DistEnv(), image_size=16, micro_batch=4, seed=0)
    with pytest.raises(ValueError, match="training needs global_batch"):
        build_loader(cfg, "train", train=True, **common)
    with pytest.raises(ValueError, match="global_batch .* is for training only"):
        build_loader(cfg, "train", train=False, global_batch=8, **common)
    with pytest.raises(TypeError, match="takes a DataCfg"):
        build_loader(str(data), "train", train=True, global_batch=4, **common)
    ev = build_loader(cfg, "train", train=False, **common)  # each rank takes micro_batch; the split whole
    assert len(ev) == 8 and ev.global_batch is None


def test_workers_are_forked_after_the_process_group_threads_settle(data: Path, monkeypatch) -> None:
    """With a process group up, the stream gives its threads a pause out of the GIL before it forks its workers
    (a child forked while one of them takes a Python thread state deadlocks: data_prep/stream_worker.py,
    bench/fork_settle.py); without one, no pause."""
    import torch.distributed as torch_dist

    import data_prep.stream_worker as stream_worker
    from runtime.dist import init_distributed, shutdown

    workers_at_settle: list[int] = []
    monkeypatch.setattr(stream_worker, "_settle", lambda: workers_at_settle.append(len(_children())))
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)  # what init_distributed exports, gone again after this test
    c10d = torch_dist.distributed_c10d
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # and the module timeouts it sets
        monkeypatch.setattr(c10d, name, getattr(c10d, name))
    before = _children()
    for grouped in (False, True):
        if grouped:
            init_distributed(DistEnv(), backend="gloo", single=True)
        try:
            ld = _loader(data)
            next(iter(ld))
            assert len(_children() - before) == 2  # the pass forked its two workers
            ld.close()
        finally:
            if grouped:
                shutdown()
        assert workers_at_settle == ([len(before)] if grouped else []), workers_at_settle  # before the fork


HANDOFF = textwrap.dedent("""
    import os, socket, sys, time
    from multiprocessing import resource_sharer
    if {quiet}:
        from data_prep.stream_worker import quiet_abandoned_handoffs
        quiet_abandoned_handoffs()
    r, w = os.pipe()
    resource_sharer.DupFd(r)  # as torch's fd sharing offers a batch's storage to the training process
    receiver = socket.socket(socket.AF_UNIX)
    receiver.connect(resource_sharer._resource_sharer._address)
    time.sleep(0.3)  # the sharer has sent its auth challenge; the receiver is interrupted before reading it
    receiver.close()
    time.sleep(0.5)
    raise ValueError("any other exception is still reported")
""")


@pytest.mark.parametrize("quiet", [False, True])
def test_a_handoff_the_training_process_abandons_prints_no_worker_traceback(quiet: bool, data: Path) -> None:
    """A second Ctrl-C can land while the training process takes a batch's file descriptors from a worker: the
    worker's resource_sharer thread then prints a ConnectionResetError traceback (seen once in CI, under
    test_interrupt's second-Ctrl-C test). The workers' init drops that report and nothing else."""
    from data_prep.stream_worker import init_worker

    r = subprocess.run([sys.executable, "-c", HANDOFF.format(quiet=quiet)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=EXIT_BOUND_S)
    assert r.returncode == 1 and r.stderr.rstrip().endswith("ValueError: any other exception is still reported")
    # without it, the reset is reported (the control; a BrokenPipeError or EOFError if the hang-up came sooner)
    assert ("multiprocessing/resource_sharer.py" in r.stderr) != quiet, r.stderr
    ld = _loader(data)
    assert ld._loader.worker_init_fn is init_worker  # every stream worker installs it
    ld.close()
