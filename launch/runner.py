"""Run the per-node processes of a job from the launching host: prefixed console output, per-node logs,
and bounded failure handling.

Each node's output goes to the console as `[node{i} {host}] line` and to `RUN_DIR/logs/node-{i}.log`.
When a node exits non-zero, the launcher names it and gives the others `grace_s` to fail on their own
(their collectives time out after `dist.timeout`); whatever is still running then is stopped. The
launcher's exit code is the first failing node's code, so a failed run never reads as a success.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.node import stop_group

SSH_LOST = 255  # ssh's own exit code: the connection failed or dropped


@dataclass
class NodeRun:
    """One process started by the launcher: a node's command (or, for pdsh, all nodes at once)."""

    label: str
    argv: list[str]
    env: dict[str, str] | None = None
    hosts: dict[str, int] = field(default_factory=dict)  # pdsh: host prefix -> node index
    proc: subprocess.Popen | None = None
    code: int | None = None
    soft_stop: bool = False  # stop with one SIGTERM to the process only (DeepSpeed's runner cleans up pdsh)
    shown: list[str] | None = None  # what --dry-run prints, when it differs from argv


class Console:
    """Prefixed console lines and per-node log files, safe to use from the reader threads."""

    def __init__(self, log_dir: Path, names: list[str]):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.names = names
        self.files = {i: open(log_dir / f"node-{i}.log", "a", encoding="utf-8") for i in range(len(names))}
        self.files[-1] = open(log_dir / "launcher.log", "a", encoding="utf-8")

    def line(self, node: int, text: str) -> None:
        prefix = f"[node{node} {self.names[node]}]" if node >= 0 else "[launch]"
        with self.lock:
            self.files[node].write(text + "\n")
            self.files[node].flush()
            print(f"{prefix} {text}", flush=True)

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _pump(run: NodeRun, node: int, console: Console) -> None:
    """Copy one process's output to the console and logs; pdsh lines `host: text` go to that host's node."""
    for raw in iter(run.proc.stdout.readline, b""):
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        target = node
        if run.hosts:
            m = re.match(r"\s*(\S+): ?(.*)", text)
            if m and m[1] in run.hosts:
                target, text = run.hosts[m[1]], m[2]
            else:
                target = -1
        console.line(target, text)


def _start(run: NodeRun) -> None:
    run.proc = subprocess.Popen(run.argv, env=run.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(runs: list[NodeRun], grace_s: float) -> None:
    """Close every node's stdin (its `launch node` stops the job), then SIGTERM/SIGKILL what is left."""
    alive = [r for r in runs if r.proc.poll() is None]
    for r in alive:
        try:
            if r.soft_stop:
                r.proc.send_signal(signal.SIGTERM)
            r.proc.stdin.close()
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(r.proc.poll() is None for r in alive):
        time.sleep(0.2)
    for r in alive:
        if r.proc.poll() is None:
            stop_group(r.proc, grace_s=5.0)


def describe_exit(run: NodeRun, code: int) -> str:
    """One line on how a node ended."""
    if code == SSH_LOST and run.argv[0] == "ssh":
        return f"{run.label}: connection lost (ssh exit 255): the node died, rebooted or became unreachable"
    if code < 0:
        return f"{run.label}: killed by signal {-code}"
    return f"{run.label}: exited with code {code}"


def run_all(runs: list[NodeRun], log_dir: Path, names: list[str], grace_s: float) -> int:
    """Start `runs`, stream their output, and return the job's exit code (see the module doc)."""
    console = Console(log_dir, names)
    stop_reason: list[str] = []

    def on_signal(signum, _frame):
        stop_reason.append(f"launcher received signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = []
    for i, run in enumerate(runs):
        _start(run)
        t = threading.Thread(target=_pump, args=(run, i, console), daemon=True)
        t.start()
        threads.append(t)
    first_fail: tuple[NodeRun, int] | None = None
    deadline = None
    try:
        while any(r.code is None for r in runs):
            for r in runs:
                if r.code is None and (code := r.proc.poll()) is not None:
                    r.code = code
                    if code != 0:
                        console.line(-1, describe_exit(r, code))
                        if first_fail is None:
                            first_fail = (r, code)
                            deadline = time.monotonic() + grace_s
                            console.line(-1, f"waiting up to {grace_s:.0f}s for the other nodes to stop")
            if stop_reason or (deadline is not None and time.monotonic() > deadline):
                console.line(-1, (stop_reason or ["grace period over"])[0] + "; stopping every node")
                _stop(runs, grace_s=min(grace_s, 10.0))
                for r in runs:
                    r.code = r.proc.wait() if r.code is None else r.code
                break
            time.sleep(0.2)
    finally:
        for t in threads:
            t.join(timeout=5)
        for s, h in old.items():
            signal.signal(s, h)
    if first_fail is not None:
        run, code = first_fail
        console.line(-1, f"job FAILED: first failure {describe_exit(run, code)}")
        console.close()
        return code if code > 0 else 1
    console.close()
    if stop_reason:
        return 130
    return 0


def scrubbed_env(drop_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """os.environ without variables starting with `drop_prefixes` (kept out of a remote shell line)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}

