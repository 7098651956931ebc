"""launch across real hosts made on this machine: DeepSpeed's launcher over pdsh/sshd, torchrun between two
network namespaces (and a node killed mid-run), and a local SLURM cluster (sbatch over 2 nodes, requeue).
Needs root and `make sysdeps`; skips with the reason otherwise.
"""

from __future__ import annotations

import re
import time

from tests.conftest import ROOT, free_port
from tests.launch_fixtures import (  # noqa: F401
    JOB,
    ds_ops_env,
    launch,
    netns_launch,
    netns_pair,
    pretrain_job,
    report,
    slurm_cluster,
    sshd,
)
from tests.test_launch import NASTY, rank_lines

# What gloo raises on a rank whose peer vanished: "pair.cc:545] Read error [10.200.0.2]:PORT: Connection reset
# by peer" (or "Connection closed by peer [ADDR]"), naming the lost peer's address.
PREEMPTED = r"preempted \((SIGUSR1|SIGTERM)\): checkpoint saved at step (\d+)"
GLOO_LOST_PEER = r"gloo/transport/tcp/pair\.cc:\d+\] .*\[10\.200\.0\.2\]"


def test_pdsh_deepspeed_launcher(tmp_path, sshd):  # noqa: F811
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=1\n127.0.0.2 slots=1\n")
    run = tmp_path / "run"
    r = launch(["run", "--hostfile", str(hf), "--launcher", "pdsh", "--ssh-config", str(sshd.config),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--run-dir", str(run),
                "--", *JOB, "--timeout", "30"], 240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    ranks = rank_lines(r.stdout)
    assert sorted((x["rank"], x["world_size"], x["launcher"]) for x in ranks) == [(0, 2, "deepspeed"),
                                                                                 (1, 2, "deepspeed")]
    # pdsh's `host: line` output is split into one log per node, in hostfile order.
    assert [x["node_rank"] for i in (0, 1) for x in rank_lines((run / "logs" / f"node-{i}.log").read_text())] == [0, 1]
    assert (run / "hostfile").read_text() == hf.read_text()  # what DeepSpeed read on every node


def test_pdsh_shell_syntax_arrives_as_data(tmp_path, sshd):  # noqa: F811
    """The worst path (DeepSpeed's runner builds a remote shell line): arguments and --env values with shell
    syntax reach the job unchanged, and none of them runs."""
    hf = tmp_path / "hosts"
    hf.write_text("127.0.0.2 slots=1\n")
    echo = tmp_path / "echo.py"
    echo.write_text("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'v': os.environ['V']}))\n")
    r = launch(["run", "--hostfile", str(hf), "--launcher", "pdsh", "--ssh-config", str(sshd.config),
                "--master-port", str(free_port()), "--run-dir", str(tmp_path / "run"), "--env", f"V={NASTY[2]}",
                "--", "python", str(echo), *NASTY], 180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert rank_lines(r.stdout) == [{"argv": NASTY, "v": NASTY[2]}]
    assert not list(ROOT.glob("PWNED*")) and not list(tmp_path.glob("PWNED*"))


def test_netns_two_hosts_pretrain(tmp_path, netns_pair, digits_shards, ds_ops_env):  # noqa: F811
    """Two hosts that see each other only over a veth pair (node2 reached over ssh) pre-train together:
    preflight checks the real dataset, both nodes exit 0 and both ranks end with the same weights."""
    run = tmp_path / "run"
    job = pretrain_job(digits_shards, run, "train.steps=10", "checkpoint.every=0", "log.every=5")
    proc = netns_launch(netns_pair, tmp_path, job, 420, *ds_ops_env, "--dataset", str(digits_shards), "--workers",
                      "1", "--global-batch", "32", "--micro-batch", "8")
    out = proc.communicate(timeout=450)[0]
    assert proc.returncode == 0, out[-4000:]
    assert "preflight: ok (2 nodes, 2 processes)" in out
    assert "10 steps of 32 (2 x 8 x 2)" in out and "deepspeed bf16" in out  # accumulation x micro x world
    result = report(run)
    assert result["steps"] == 10 and result["world_size"] == 2
    assert len(result["rank_digests"]) == 2 and result["rank_digests"][0] == result["rank_digests"][1], result
    logs = [(run / "logs" / f"node-{i}.log").read_text() for i in (0, 1)]
    assert sum("done: step 10" in x for x in logs) == 1 and all("deepspeed" in x.lower() for x in logs)


def test_netns_node_killed_mid_run(tmp_path, netns_pair, digits_shards, ds_ops_env):  # noqa: F811
    """kill -9 every process of node2 mid-training: node1 fails on its own within the collective timeout
    (before the launcher's grace runs out), the launcher names the lost node and exits non-zero."""
    run = tmp_path / "run"
    job = pretrain_job(digits_shards, run, "train.steps=100000", "checkpoint.every=0", "log.every=5",
                       "dist.timeout=15")
    proc = netns_launch(netns_pair, tmp_path, job, 420, *ds_ops_env)
    lines = []
    deadline = time.monotonic() + 360
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "step 10/100000" in line:
            break
    assert "step 10/100000" in lines[-1], "".join(lines)[-4000:]
    assert netns_pair.kill_host(1) > 0
    t0 = time.monotonic()
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    elapsed = time.monotonic() - t0
    assert proc.returncode not in (0, None), out[-4000:]
    assert "node 1 (10.200.0.2, 1 processes): connection lost (ssh exit 255)" in out, out[-4000:]
    assert "node 0 (10.200.0.1, 1 processes): exited with code 1" in out, out[-4000:]
    assert "grace period over" not in out and elapsed < 15 + 30, f"took {elapsed:.0f}s after the kill"
    assert "job FAILED" in out
    node1 = (run / "logs" / "node-0.log").read_text()
    assert re.search(GLOO_LOST_PEER, node1), node1[-3000:]


def _wait_for(pred, timeout: float, what: str, describe=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := pred():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} {describe()}")


def _sbatch(cluster, tmp_path, job: list[str], opts: list[str]) -> str:
    """`launch sbatch --submit` a 2-node CPU job; return its id."""
    args = ["sbatch", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "1", "--time", "00:10:00",
            "--run-dir", str(tmp_path / "run"), "--master-port", str(free_port()), "--grace", "20", "--submit",
            *opts, "--", *job]
    r = launch(args, 120, env=cluster.env)
    assert r.returncode == 0 and "launch: sbatch exit 0: job " in r.stdout, r.stdout + r.stderr
    return r.stdout.split("job ")[-1].split()[0]


def _nodes_idle(cluster) -> bool:
    """Every node idle and no step daemon of this cluster left: the previous run is cleaned up on the nodes too.
    (slurmctld reports the nodes idle before their slurmd forgot the killed run; a restart then was refused
    with "Job 1 already killed, do not launch batch job" and the job FAILED: seen in CI.)"""
    import psutil

    states = cluster.run("sinfo", "-h", "-N", "-o", "%T").stdout.split()
    if not states or any(s != "idle" for s in states):
        return False
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] == "slurmstepd" and p.environ().get("SLURM_CONF") == cluster.env["SLURM_CONF"]:
                return False
        except psutil.Error:
            pass
    return True


def _requeued(cluster, job_id: str, restarts: int) -> None:
    """Wait until the job is back in the queue and its nodes are idle, then let it start now (SLURM holds a
    requeued job ~2 min). Started while a node still cleaned up the previous run, the batch launch failed at
    once (seen in CI: JobState FAILED, ExitCode 1:0, nothing written), so the nodes must be idle first."""
    _wait_for(lambda: cluster.job(job_id).get("Restarts") == str(restarts)
              and cluster.job(job_id).get("JobState") == "PENDING", 120, f"requeue #{restarts}")
    _wait_for(lambda: _nodes_idle(cluster), 120, "idle nodes after the requeue",
              lambda: cluster.run("sinfo", "-N").stdout)
    time.sleep(2)  # slurmd forgets a killed job a moment after its step daemon ends
    assert cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now").returncode == 0


JOB_KEYS = ("JobState", "Reason", "Restarts", "BeginTime", "StartTime", "NodeList", "ExitCode")


def _released(cluster, job_id: str, pred):
    """`pred`, after lifting a requeue hold that SLURM (re)applied after `_requeued` lifted it: seen in CI, where
    the job stayed PENDING (BeginTime) long after `StartTime=now` on a loaded machine."""

    def check():
        info = cluster.job(job_id)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime" and _nodes_idle(cluster):
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return pred()

    return check


def test_slurm_sbatch_two_nodes_preempted_twice(tmp_path, slurm_cluster, digits_shards, ds_ops_env):  # noqa: F811
    """`launch sbatch --submit` runs the trainer over `-N 2`; the job is preempted twice: SIGUSR1 before the
    time limit (the launcher forwards it to the ranks, they checkpoint and exit 0, the launcher requeues), then
    `scontrol requeue` (SIGTERM to every task: checkpoint, exit 143, SLURM requeues). Each time it resumes from
    the step it saved; the job ends COMPLETED, with its output files and the same model on both ranks."""
    run, steps = tmp_path / "run", 80  # preempted after ~10 and ~25 steps: room to spare, not to wait out
    job = pretrain_job(digits_shards, run, f"train.steps={steps}", "checkpoint.every=0", "log.every=5",
                       "checkpoint.signal_check_every=1")
    job_id = _sbatch(slurm_cluster, tmp_path, job, ds_ops_env)
    out_file = run / "logs" / f"slurm-{job_id}.out"
    text = lambda: out_file.read_text() if out_file.exists() else ""  # noqa: E731
    logged = lambda: max(map(int, re.findall(rf"step (\d+)/{steps} ", text())), default=0)  # noqa: E731
    saved = lambda: sorted({(int(n), sig) for sig, n in re.findall(PREEMPTED, text())})  # noqa: E731

    _wait_for(lambda: logged() >= 10, 300, "10 steps")
    assert slurm_cluster.run("scancel", "--batch", "--signal=USR1", job_id).returncode == 0
    _requeued(slurm_cluster, job_id, 1)
    first = saved()[0][0]
    job = lambda: {k: v for k, v in slurm_cluster.job(job_id).items() if k in JOB_KEYS}  # noqa: E731
    _wait_for(_released(slurm_cluster, job_id, lambda: logged() >= first + 10), 300, "10 steps after the first resume",
              lambda: f"(job {job()}, output tail: {text()[-1500:]})")
    assert slurm_cluster.run("scontrol", "requeue", job_id).returncode == 0
    _requeued(slurm_cluster, job_id, 2)
    _wait_for(_released(slurm_cluster, job_id, lambda: slurm_cluster.job(job_id).get("JobState") == "COMPLETED"), 300,
              "completion", lambda: f"(job {job()})")

    out = text()
    assert slurm_cluster.job(job_id)["ExitCode"] == "0:0", out[-3000:]
    assert saved() == [(first, "SIGUSR1"), (saved()[1][0], "SIGTERM")] and saved()[1][0] >= first + 10, out[-3000:]
    assert [int(n) for n in re.findall(r"resumed from global_step(\d+) ", out)] == [x[0] for x in saved()]
    assert "launch: SIGUSR1 received; requeueing SLURM job" in out
    assert out.count("preflight: ok (2 nodes, 2 processes)") == 3
    result = report(run)
    assert result["steps"] == steps and len(set(result["rank_digests"])) == 1 and len(result["rank_digests"]) == 2
    logs = [(run / "logs" / f"node-{i}.log").read_text() for i in (0, 1)]
    assert sum(f"done: step {steps}" in x for x in logs) == 1  # rank 0 ran on one node, rank 1 on the other
