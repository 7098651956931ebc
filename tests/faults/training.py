"""Training faults: kill -9 of a rank / a node / the launcher / a rank mid-checkpoint, preemption, NaN batches,
a full disk during a checkpoint. Each must end every process promptly and resume to the uninterrupted result."""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from pretrain.config import load_pretrain_config
from tests.conftest import free_port, run_torchrun
from tests.faults.harness import Ctx, Outcome, scenario
from tests.launch_fixtures import ds_ops_build_env, need_root
from tests.pretrain_fixtures import _keys, _report, _scalars, _train, max_diff, train_args
from trainer.optim import lr_at

STEPS = 40  # checkpoints every 10, the ranks agree on a preemption signal every 5
COMMON = (f"train.steps={STEPS}", "checkpoint.every=10", "checkpoint.signal_check_every=5", "eval.every=0",
          "log.every=1", "debug.record_keys=true")
EXIT_S = 60.0  # every process of a faulted job must be gone this long after the fault (dist.timeout is 120)
TOL = 1e-6  # resumed vs uninterrupted fp32 weights (the pre-training tests' tolerance)


@functools.cache
def ds_env() -> dict[str, str]:
    """The trainer runs' environment (once per session): DeepSpeed's CPU op from the tests' own build cache."""
    return ds_ops_build_env()


class Job:
    """One torchrun agent whose merged output is read, with arrival times, by a background thread."""

    def __init__(self, run_dir: Path, data: Path, *overrides: str, **kw):
        self.proc = run_torchrun(train_args(data, run_dir, *overrides), extra_env=ds_env(), **kw)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def why(self) -> str:
        """For failure messages: every rank's error lines, then the end of the output."""
        out = self.output()
        errors = [x for x in out.splitlines() if "Error" in x and "Warning" not in x]
        return "\n".join(errors[-20:]) + "\n...\n" + out[-2000:]

    def wait_for(self, text: str, timeout: float = 300) -> float:
        """Time at which a line containing `text` was printed; fails if the job ends or times out first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            ended = self.proc.poll() is not None
            if ended:
                self.reader.join(timeout=10)  # the lines printed just before the end
            for t, line in list(self.lines):
                if text in line:
                    return t
            assert not ended, f"job ended before {text!r}:\n{self.why()}"
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} within {timeout:.0f} s:\n{self.why()}")

    def processes(self) -> list[psutil.Process]:
        """The agent, its ranks and their loader workers (taken while the job runs)."""
        agent = psutil.Process(self.proc.pid)
        return [agent, *agent.children(recursive=True)]


def ranks(procs: list[psutil.Process]) -> dict[int, psutil.Process]:
    """RANK -> process, among the agent (first) and its descendants."""
    out = {}
    for p in procs:
        try:
            env = p.environ()
        except psutil.Error:
            continue
        if "RANK" in env and p.ppid() == procs[0].pid:  # the agent's children are the ranks
            out[int(env["RANK"])] = p
    return out


def pause(job: Job, procs: list[psutil.Process]) -> tuple[list[psutil.Process], int]:
    """Stop the job's ranks (SIGSTOP) and return them with the last step they logged, so that a fault lands at a
    known step: the ranks run on while their log line travels to the test, by 10 steps and more on a loaded
    machine (a fault meant for step 29 landed at 40). `resume` them once the fault is applied."""
    stopped = list(ranks(procs).values())
    for p in stopped:
        p.suspend()
    # the lines printed before the stop reach the reader thread: wait until none arrived for 0.5 s (a loaded
    # machine can hold a line in the pipe longer than a fixed pause; a step read short lets the ranks pass an
    # agreement before the fault)
    count, deadline = -1, time.time() + 30
    while len(job.lines) != count and time.time() < deadline:
        count = len(job.lines)
        time.sleep(0.5)
    return stopped, max(int(s) for s in re.findall(r"\bstep (\d+)/", job.output()))


def resume(stopped: list[psutil.Process]) -> None:
    for p in stopped:
        p.resume()


def gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped (by an init that may never reap)
    except psutil.NoSuchProcess:
        return True


def wait_gone(procs: list[psutil.Process], since: float, timeout: float = EXIT_S) -> float:
    """Seconds from `since` until every process in `procs` has exited; kills them and fails on timeout."""
    deadline = since + timeout
    while not all(gone(p) for p in procs):
        if time.time() > deadline:
            alive = [p for p in procs if not gone(p)]
            for p in alive:
                p.kill()
            raise AssertionError(f"still running {timeout:.0f} s after the fault: {[p.pid for p in alive]}")
        time.sleep(0.05)
    return time.time() - since


def baseline(ctx: Ctx) -> Path:
    """The uninterrupted run, cached for the session under its overrides."""
    run = ctx.cache / f"train-baseline-{hashlib.sha1(' '.join(COMMON).encode()).hexdigest()[:10]}"
    if not (run / "report.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        rc, out = _train(ctx.digits, run, *COMMON, extra_env=ds_env())
        assert rc == 0, out[-4000:]
    return run


def weights(run_dir: Path) -> dict:
    from trainer.export import consolidate

    return consolidate(run_dir)[0]


def latest(run_dir: Path) -> str | None:
    f = run_dir / "checkpoints" / "latest"
    return f.read_text().strip() if f.exists() else None


def resume_equals_baseline(ctx: Ctx, run_dir: Path) -> int:
    """Rerun the job in `run_dir`: it resumes from `latest` and ends with the baseline's weights and samples.
    Returns the samples lost or changed per (rank, micro-batch) against the baseline."""
    tag = latest(run_dir)
    if tag is not None:
        assert (run_dir / "checkpoints" / tag / "trainer_state.json").exists(), f"`latest` names incomplete {tag}"
    rc, out = _train(ctx.digits, run_dir, *COMMON, extra_env=ds_env())
    assert rc == 0, out[-4000:]
    assert tag is None or f"resumed from {tag}" in out, f"did not resume from {tag}:\n{out[-3000:]}"
    assert _report(run_dir)["steps"] == STEPS
    base = baseline(ctx)
    diff = max_diff(weights(base), weights(run_dir))
    assert diff <= TOL, f"resumed weights differ from the uninterrupted run's by {diff:.3g}"
    want, got = _keys(base), _keys(run_dir)
    lost = sum(len(set(v) ^ set(got.get(k, []))) for k, v in want.items()) + len(got.keys() - want.keys())
    assert lost == 0, f"{lost} samples differ from the uninterrupted run's"
    return lost


def kill_step(ctx: Ctx, lo: int = 2, hi: int = STEPS - 1) -> int:
    return ctx.rng.randint(lo, hi)


@scenario("train-kill-rank", "kill -9 of one rank at a random step: the job exits, resumes to identical weights",
          trials=2)
def train_kill_rank(ctx: Ctx) -> Outcome:
    step, rank, run = kill_step(ctx), ctx.rng.randrange(2), ctx.work / "run"
    job = Job(run, ctx.digits, *COMMON, f"debug.kill_at_step={step}", f"debug.kill_rank={rank}")
    job.wait_for("ViT debug")
    procs = job.processes()
    victim = ranks(procs)[rank]
    wait_gone([victim], time.time(), timeout=300)  # it kills itself at `step`
    exit_s = wait_gone(procs, time.time())
    assert job.proc.wait() != 0, "torchrun should fail when a rank dies"
    lost = resume_equals_baseline(ctx, run)
    return Outcome(lost, exit_s, f"rank {rank} killed after step {step}")


@scenario("train-kill-node", "kill -9 of a whole node (2 agents, --nnodes 2): the other node exits by itself, resumes",
          trials=2)
def train_kill_node(ctx: Ctx) -> Outcome:
    step, node, run, port = kill_step(ctx), ctx.rng.randrange(2), ctx.work / "run", free_port()
    jobs = [Job(run, ctx.digits, *COMMON, nproc=1, nnodes=2, node_rank=n, port=port, session=True) for n in (0, 1)]
    jobs[0].wait_for(f"step {step}/")  # rank 0 (node 0) logs
    survivors = jobs[1 - node].processes()
    os.killpg(jobs[node].proc.pid, signal.SIGKILL)
    t0 = time.time()
    exit_s = wait_gone(survivors, t0)
    assert jobs[1 - node].proc.wait() != 0, "the surviving node must fail, not report success"
    lost = resume_equals_baseline(ctx, run)
    return Outcome(lost, exit_s, f"node {node} killed at step {step}")


@scenario("train-kill-launcher", "kill -9 of the torchrun agent: its workers checkpoint and stop instead of living on",
          trials=2)
def train_kill_launcher(ctx: Ctx) -> Outcome:
    step, run = kill_step(ctx, hi=STEPS - 10), ctx.work / "run"  # room to show the orphans do not train on
    job = Job(run, ctx.digits, *COMMON)
    job.wait_for(f"step {step}/")
    procs = job.processes()
    stopped, seen = pause(job, procs)
    job.proc.kill()
    t0 = time.time()
    # the agent fully gone (its ranks re-parented) before they run on: SIGKILL of a process with threads and a
    # large address space takes a moment, and a rank asking for its parent meanwhile still sees the agent
    job.proc.wait(timeout=EXIT_S)
    resume(stopped)
    exit_s = wait_gone(procs[1:], t0)
    out = job.output()
    assert "the launcher (pid" in out and "preempted (SIGTERM)" in out, out[-3000:]
    assert not (run / "report.json").exists(), "the orphaned workers trained to the end"
    stop = int(latest(run).removeprefix("global_step"))
    # at the first agreement boundary (every 5 steps) from the step the ranks were paused at, the kill's step
    assert stop % 5 == 0 and seen <= stop <= seen + 5, f"orphans checkpointed at {stop}, killed after step {seen}"
    lost = resume_equals_baseline(ctx, run)
    return Outcome(lost, exit_s, f"launcher killed at step {seen}; workers stopped at {stop}")


@scenario("train-kill-in-checkpoint", "kill -9 of a rank mid checkpoint write: `latest` stays on the previous one",
          trials=2)
def train_kill_in_checkpoint(ctx: Ctx) -> Outcome:
    step, rank, run = ctx.rng.choice(range(10, STEPS + 1, 10)), ctx.rng.randrange(2), ctx.work / "run"
    job = Job(run, ctx.digits, *COMMON, f"debug.kill_at_step={step}", f"debug.kill_rank={rank}",
              "debug.kill_in_save=true")
    job.wait_for("ViT debug")
    procs = job.processes()
    victim = ranks(procs)[rank]
    wait_gone([victim], time.time(), timeout=300)
    exit_s = wait_gone(procs, time.time())
    assert job.proc.wait() != 0
    assert (run / "checkpoints" / f"global_step{step}").is_dir(), "the kill came before the write"
    prev = f"global_step{step - 10}" if step > 10 else None
    assert latest(run) == prev, f"`latest` is {latest(run)}, expected {prev}: a half-written checkpoint was chosen"
    lost = resume_equals_baseline(ctx, run)
    return Outcome(lost, exit_s, f"rank {rank} killed inside the step-{step} save")


@scenario("preemption", "SIGTERM to every rank (SLURM preemption): checkpoint, exit 143 within the grace, resume",
          trials=2)
def preemption(ctx: Ctx) -> Outcome:
    step, run = kill_step(ctx, hi=STEPS - 6), ctx.work / "run"
    job = Job(run, ctx.digits, *COMMON)
    job.wait_for(f"step {step}/")
    procs = job.processes()
    stopped, seen = pause(job, procs)
    t0 = time.time()
    for p in procs[1:]:  # SLURM signals every task of the step, not only the launcher
        p.send_signal(signal.SIGTERM)
    resume(stopped)  # the paused ranks take their SIGTERM now
    exit_s = wait_gone(procs, t0)
    out = job.output()
    assert "preempted (SIGTERM): checkpoint saved at step" in out, out[-3000:]
    assert out.count("exitcode  : 143") >= 1 and "exitcode  : 1 " not in out, out[-2000:]  # 128 + SIGTERM
    stop = int(latest(run).removeprefix("global_step"))
    assert seen <= stop <= seen + 5 and exit_s < 30, (seen, stop, exit_s)  # SLURM's default KillWait is 30 s
    lost = resume_equals_baseline(ctx, run)
    return Outcome(lost, exit_s, f"SIGTERM at step {seen}, checkpoint at {stop}")


@scenario("nan-injection", "a NaN batch is skipped and counted; K NaN steps in a row stop with the step and keys named",
          trials=2)
def nan_injection(ctx: Ctx) -> Outcome:
    one, rank, k = kill_step(ctx), ctx.rng.randrange(2), 3
    run = ctx.work / "once"
    rc, out = _train(ctx.digits, run, *COMMON, f"debug.nan_at_steps=[{one}]", f"debug.kill_rank={rank}",
                     extra_env=ds_env())
    assert rc == 0, out[-4000:]
    assert _report(run)["skipped_steps"] == 1 and f"step {one} skipped: non-finite" in out, out[-3000:]
    assert all(bool(v.isfinite().all()) for v in weights(run).values()), "a skipped step changed weights to NaN"
    # The LR schedule counts applied steps only: from the skipped step on, every LR is the uninterrupted
    # schedule's of the steps applied so far (one behind), read back from TensorBoard (logged every step).
    optim = load_pretrain_config("debug_cpu", ["data.path=x", "run.dir=x", *COMMON]).optim
    lrs = dict(_scalars(run)["train/lr"])
    want = {s: lr_at(s - 1 - (s > one), STEPS, optim) for s in range(1, STEPS + 1)}
    off = {s: (lrs.get(s), lr) for s, lr in want.items() if lrs.get(s) is None or abs(lrs[s] - lr) > 1e-6 * lr}
    assert not off, f"LR (logged, applied-steps schedule) differs after the skip at step {one}: {off}"
    first = kill_step(ctx, hi=STEPS - k)
    bad = list(range(first, first + k))
    run = ctx.work / "stop"
    job = Job(run, ctx.digits, *COMMON, f"debug.nan_at_steps={bad}", f"debug.kill_rank={rank}",
              f"train.max_bad_steps={k}")
    t0 = job.wait_for(f"{k} consecutive steps up to step {bad[-1]}")
    exit_s = wait_gone(job.processes() if job.proc.poll() is None else [], t0)
    assert job.proc.wait() != 0
    out = job.output()
    # the stop names the batch: the keys rank `rank` recorded for that step's first micro-batch
    micro = (bad[-1] - 1) * 2  # 2 micro-batches per step (global 32 = micro 8 x 2 x 2 ranks)
    keys = _keys(run)[(rank, micro)][:8]
    line = next(x for x in out.splitlines() if x.startswith("error:") and f"on rank {rank}:" in x)
    assert ", ".join(keys) in line, (keys, line)
    return Outcome(0, exit_s, f"NaN at step {one} skipped; steps {bad} stopped the run")


@scenario("disk-full-checkpoint", "a full disk during a checkpoint: clear ENOSPC error on all ranks, previous intact",
          trials=2)
def disk_full_checkpoint(ctx: Ctx) -> Outcome:
    need_root("mount")
    base = baseline(ctx)
    per_ckpt = sum(f.stat().st_size for f in (base / "checkpoints").rglob("*") if f.is_file()) / 2
    size_kib = math.ceil(per_ckpt * 1.6 / 4096) * 4  # one checkpoint and the logs fit, a second does not
    run = ctx.work / "disk"
    run.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(run)], check=True)
    try:
        job = Job(run, ctx.digits, *COMMON)
        t0 = job.wait_for("could not be written")
        exit_s = wait_gone(job.processes() if job.proc.poll() is None else [], t0)
        assert job.proc.wait() != 0
        out = job.output()
        errors = [x for x in out.splitlines() if x.startswith("error: checkpoint global_step")]
        assert len(errors) == 2 and all("ENOSPC" in x and "free space" in x for x in errors), out[-3000:]
        tag = latest(run)
        failed = errors[0].split()[2]
        assert tag and tag != failed and not (run / "checkpoints" / failed).exists(), (tag, failed)
        subprocess.run(["mount", "-o", "remount,size=64m", str(run)], check=True)
        lost = resume_equals_baseline(ctx, run)
    finally:
        subprocess.run(["umount", "-l", str(run)], check=False)
    return Outcome(lost, exit_s, f"{size_kib} KiB disk: {failed} failed, {tag} kept")
