"""Fault scenarios: one function each, run CI-sized by `tests/faults/test_*.py` and randomised by bench/faults.py.

A scenario injects one kind of fault into the real pipeline (real processes, real DeepSpeed, real files),
checks every promise with plain `assert`s (an AssertionError means the scenario was not survived) and
returns what it measured. `ctx.full` selects the longer randomised version; `ctx.rng` draws every random
choice (kill moments, steps, which shard to break) so a failing trial reruns from its seed.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Ctx:
    """What one trial gets: a fresh directory, its random draws, its size and the shared digits shards."""

    work: Path  # empty directory owned by this trial
    rng: random.Random  # every random choice of the trial comes from here
    full: bool  # False: CI-sized (make test); True: the longer randomised version (make faults)
    digits: Path  # dataset.json of the shared digits shards (read-only; copy before breaking anything)
    cache: Path  # shared by every trial of one session: reusable expensive results (e.g. an uninterrupted run)


@dataclass
class Outcome:
    """What a survived trial measured."""

    data_lost: int = 0  # samples, shards or files lost or changed that should not have been (must stay 0)
    exit_s: float | None = None  # longest time from the fault to the last affected process exiting
    detail: str = ""  # one line for the report (e.g. "killed at step 37 during checkpoint write")
    extra: dict = field(default_factory=dict)  # scenario-specific figures (RSS, fds, throughput...)


Scenario = Callable[[Ctx], Outcome]


@dataclass
class Entry:
    """A registered scenario."""

    fn: Scenario
    proves: str  # what a survived trial proves, one line (its row text in docs/reliability.md)
    trials: int  # trials of the randomised run (bench/faults.py) unless --trials says otherwise


SCENARIOS: dict[str, Entry] = {}


def scenario(name: str, proves: str, trials: int = 3) -> Callable[[Scenario], Scenario]:
    """Register a scenario under `name` for bench/faults.py (`trials`: its default count there)."""

    def register(fn: Scenario) -> Scenario:
        if name in SCENARIOS:
            raise ValueError(f"fault scenario {name!r} registered twice")
        SCENARIOS[name] = Entry(fn, proves, trials)
        return fn

    return register


def wait_exit(procs: list[subprocess.Popen], since: float, timeout: float) -> float:
    """Wait until every process has exited; seconds from `since` to the last exit. Kills and fails on timeout."""
    deadline = since + timeout
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            msg = f"process {p.pid} ({p.args!r:.120}) still running {timeout:.0f} s after the fault"
            raise AssertionError(msg) from None
    return time.time() - since
