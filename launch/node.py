"""What runs on each node: `launch node` (supervise one node's command) and `launch exec` (decode a payload).

`launch node` starts the node's command in its own session and
- puts the venv's bin folder first on PATH, so `python`/`torchrun` mean the same interpreter everywhere;
- copies its output, then its exit code, to a log file when asked (under srun, where there is no launcher
  process to do it, and on nodes reached over ssh, whose output the launcher loses with the connection);
- with --watch-stdin, stops the command when its stdin closes: the launcher (or the ssh link to it) is gone,
  so a node never keeps training on its own;
- forwards SIGTERM/SIGINT/SIGHUP to the command's process group, and SIGUSR1 to the ranks (the grandchildren:
  torchrun itself would die of SIGUSR1, so it is started with SIGUSR1 ignored);
- exits with the command's exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil

from launch.commands import decode_payload

STOP_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long


def _venv_env(env: dict[str, str]) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        env["PATH"] = bindir + (os.pathsep + path if path else "")
    return env


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group of `proc`, SIGKILL it if still alive after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _forward_signals(proc: subprocess.Popen) -> None:
    def to_group(signum, _frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    def to_ranks(signum, _frame):
        try:
            kids = psutil.Process(proc.pid).children()
            ranks = [g for k in kids for g in k.children()] or kids
        except psutil.Error:
            return
        for p in ranks:
            try:
                p.send_signal(signum)
            except psutil.Error:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, to_group)
    signal.signal(signal.SIGUSR1, to_ranks)


def _watch_stdin(proc: subprocess.Popen) -> None:
    """Stop the command once stdin reaches end of file (the launcher closed it or its connection dropped)."""
    def watch():
        while os.read(0, 4096):
            pass
        if proc.poll() is None:
            print("launch node: launcher went away; stopping this node's processes", flush=True)
            stop_group(proc)

    threading.Thread(target=watch, daemon=True).start()


def run_node(argv: list[str], log: str | None = None, watch_stdin: bool = False) -> int:
    """Run `argv` as this node's command (see the module doc); return its exit code."""
    env = _venv_env(dict(os.environ))
    out = subprocess.PIPE if log else None
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if log
                            else None, start_new_session=True, preexec_fn=_ignore_usr1)
    _forward_signals(proc)
    if watch_stdin:
        _watch_stdin(proc)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        echo = True
        with open(log, "ab", buffering=0) as f:
            for line in iter(proc.stdout.readline, b""):
                f.write(line)
                if echo:
                    try:
                        sys.stdout.buffer.write(line)
                        sys.stdout.flush()
                    except OSError:  # the launcher's connection is gone (EPIPE): keep the node's own log going
                        echo = False
    while True:  # wait() in short slices so the signal handlers run promptly
        try:
            code = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            continue
    code = code if code >= 0 else 128 - code
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"launch node: exit code {code}\n")
    return code


def exec_payload(payload: str) -> None:
    """Replace this process with the job a payload describes (the pdsh path, one call per rank)."""
    spec = decode_payload(payload)
    env = _venv_env({**os.environ, **spec["env"]})
    os.chdir(spec["cwd"])
    sys.stdout.flush()
    os.execvpe(spec["argv"][0], spec["argv"], env)

