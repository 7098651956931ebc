"""Network loss: one node of a two-host job drops off the network mid-run (its link goes down; nothing is
killed). Every process on both hosts must exit non-zero on its own within the configured timeouts, the
launcher must name the lost node, and a rerun once the link is back must resume from the last checkpoint
and finish.

The two hosts are network namespaces joined by a veth pair (tests/launch_fixtures.make_netns_pair), with
`net.ipv4.tcp_retries2=3` inside them so that TCP gives up on a silent peer in seconds; the trainer's
collectives time out after `dist.timeout`.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time

import psutil

from tests.faults.harness import Ctx, Outcome, scenario, wait_exit
from tests.launch_fixtures import SSHD, build_ds_ops, make_netns_pair, need_root, netns_launch, pretrain_job, report

DIST_TIMEOUT = 20  # s: the trainer's collective timeout in this scenario
SSH_LOSS_S = 15  # s: the launcher's ssh keepalives (launch.commands.SSH_ALIVE) notice a silent node
STARTUP_S = 300  # s: both nodes start DeepSpeed and reach the step where the link is cut


def _job_pids(ns: str) -> list[int]:
    """The job's processes in namespace `ns` (launch node, torchrun, ranks: python), not its sshd."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, out.split()):
        try:
            if "python" in " ".join(psutil.Process(pid).cmdline()[:1]).lower():
                pids.append(pid)
        except psutil.Error:
            pass
    return pids


def _read_until(proc: subprocess.Popen, pattern: str, timeout: float, lines: list[str]) -> re.Match:
    """Read the launcher's output into `lines` until a line matches `pattern`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if m := re.search(pattern, line):
            return m
    proc.kill()
    raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f}s:\n{''.join(lines)[-4000:]}")


def _wait_gone(names: tuple[str, ...], since: float, timeout: float) -> list[float]:
    """Seconds from `since` until each namespace runs none of the job's processes (fails after `timeout`)."""
    gone: dict[str, float] = {}
    while len(gone) < len(names):
        for ns in names:
            if ns not in gone and not _job_pids(ns):
                gone[ns] = time.monotonic() - since
        if time.monotonic() - since > timeout:
            left = {ns: [" ".join(psutil.Process(p).cmdline())[:100] for p in _job_pids(ns)] for ns in names}
            raise AssertionError(f"still running {timeout:.0f}s after the link went down: {left}")
        time.sleep(0.2)
    return [gone[ns] for ns in names]


@scenario("network-loss", "a node of a 2-host job loses its link mid-run: every process exits non-zero within "
                          "the timeouts, the launcher names the lost node, a rerun resumes and finishes", trials=2)
def network_loss(ctx: Ctx) -> Outcome:
    need_root("ip", "unshare", SSHD, "ssh")
    every = 10 if ctx.full else 4
    steps = 40 if ctx.full else 12
    # After at least one checkpoint, before the end; not on a checkpoint step, whose log line comes before
    # its save (the newest complete checkpoint is then known: the last multiple of `every` before it).
    cut_at = ctx.rng.choice([s for s in range(every + 1, steps - 1) if s % every])
    ds_ops = build_ds_ops()
    run = ctx.work / "run"
    job = pretrain_job(ctx.digits, run, f"train.steps={steps}", f"checkpoint.every={every}", "log.every=1",
                       f"dist.timeout={DIST_TIMEOUT}", "data.workers=0")
    # The slowest way out: a collective timeout, then ssh giving up; plus room for a loaded 2-core machine
    # (seen: 11 s typical, over 50 s with two training jobs beside it). The figure measured is what is reported.
    limit = DIST_TIMEOUT + SSH_LOSS_S + 45
    with make_netns_pair(ctx.work / "ssh", suffix="n") as pair:
        proc = netns_launch(pair, ctx.work, job, STARTUP_S + 120, *ds_ops, grace=limit)
        lines: list[str] = []
        _read_until(proc, rf"step {cut_at}/{steps}\b", STARTUP_S, lines)
        drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        drain.start()  # keep reading: a launcher blocked on a full pipe would look like a hang
        pair.set_link(1, up=False)
        t0, t0_wall = time.monotonic(), time.time()
        node1_s, node2_s = _wait_gone(pair.names, t0, limit)
        exit_s = max(node1_s, node2_s, wait_exit([proc], t0_wall, limit))
        drain.join(timeout=10)
        out = "".join(lines)
        assert proc.returncode not in (0, None), out[-4000:]
        assert "node 1 (10.200.0.2, 1 processes): connection lost" in out, out[-4000:]
        assert re.search(r"node 0 \(10\.200\.0\.1, 1 processes\): exited with code [1-9]", out), out[-4000:]
        assert "grace period over" not in out, "a node did not stop on its own:\n" + out[-4000:]
        own = (run / "logs" / "node-1.on-node.log").read_text()  # node 2's own account: the launcher lost it
        code = re.findall(r"launch node: exit code (-?\d+)", own)
        assert code and int(code[-1]) != 0, f"node 2 did not exit non-zero on its own:\n{own[-3000:]}"
        latest = (run / "checkpoints" / "latest").read_text().strip()
        saved = int(latest.removeprefix("global_step"))
        assert saved == cut_at // every * every, f"latest is {latest}, cut at step {cut_at}"

        pair.set_link(1, up=True)
        proc = netns_launch(pair, ctx.work, job, STARTUP_S + 120, *ds_ops, grace=limit)
        out2 = proc.communicate(timeout=STARTUP_S + 150)[0]
        assert proc.returncode == 0, out2[-4000:]
    assert f"resumed from {latest} (step {saved}," in out2, out2[-4000:]
    done = report(run)
    assert done["steps"] == steps and done["rank_digests"][0] == done["rank_digests"][1], done
    return Outcome(data_lost=steps - done["steps"], exit_s=exit_s,
                   detail=f"link of node 2 down at step {cut_at}; resumed from step {saved}",
                   extra={"node1_exit_s": round(node1_s, 1), "node2_exit_s": round(node2_s, 1),
                          "node2_exit_code": int(code[-1])})
