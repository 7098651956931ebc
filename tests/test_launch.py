"""launch: hostfiles, command building and quoting, sbatch/accelerate files, preflight, and real loopback runs
(torchrun on two local "nodes", DeepSpeed --no_ssh started per node).
Runs across real ssh/pdsh, network namespaces and SLURM are in test_launch_hosts.py.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys

import pytest

from launch.accel import accelerate_commands, accelerate_config, write_config
from launch.commands import (
    Job,
    LaunchError,
    decode_payload,
    encode_payload,
    parse_env,
    parse_job,
    propagated_env,
    ssh_argv,
)
from launch.hostfile import Host, HostfileError, check_host, is_local, parse_hosts, select_hosts
from launch.jobcheck import Fact, JobFacts
from launch.preflight import Probe, evaluate, probe_info
from launch.slurm import SbatchSpec, sbatch_script
from tests.conftest import ROOT, free_port
from tests.launch_fixtures import JOB, launch

NASTY = ["a b", "x;touch PWNED", "$(touch PWNED2)", "`touch PWNED3`", "'q'\"q\"", "&& rm -rf /nonexistent", "*"]


def rank_lines(text: str) -> list[dict]:
    """The JSON lines the job printed (console lines are prefixed `[nodeI host] `)."""
    out = []
    for line in text.splitlines():
        body = line.split("] ", 1)[1] if line.startswith("[node") else line
        if body.startswith("{"):
            out.append(json.loads(body))
    return out


# ---- hostfiles --------------------------------------------------------------------------------------------

def test_hostfile_comments_blank_lines_and_slots():
    text = "# cluster\n\nworker-1 slots=8   # first\n10.0.0.2 slots=4\nfe80::1 slots=2\n"
    assert parse_hosts(text) == [Host("worker-1", 8), Host("10.0.0.2", 4), Host("fe80::1", 2)]


@pytest.mark.parametrize("line,why", [
    ("worker-1", "expected 'HOST slots=N'"),
    ("worker-1 slots=0", "positive integer"),
    ("worker-1 slots=eight", "positive integer"),
    ("worker-1 gpus=8", "expected 'HOST slots=N'"),
    ("bad;host slots=1", "not a valid host name"),
    ("$(touch${IFS}x) slots=1", "not a valid host name"),
    ("host|nc slots=1", "not a valid host name"),
])
def test_hostfile_bad_line_names_the_line(line, why):
    with pytest.raises(HostfileError) as e:
        parse_hosts(f"ok-host slots=1\n{line}\n", source="hf")
    assert "hf line 2" in str(e.value) and why in str(e.value)


def test_hostfile_duplicate_and_empty():
    with pytest.raises(HostfileError, match="line 2.*listed twice"):
        parse_hosts("a slots=1\na slots=2\n")
    with pytest.raises(HostfileError, match="lists no hosts"):
        parse_hosts("# nothing\n")


def test_include_exclude():
    hosts = parse_hosts("a slots=1\nb slots=2\nc slots=3\n")
    assert [h.name for h in select_hosts(hosts, include="c,a")] == ["a", "c"]  # hostfile order kept
    assert [h.name for h in select_hosts(hosts, exclude="b@c")] == ["a"]
    with pytest.raises(HostfileError, match="not in the hostfile"):
        select_hosts(hosts, include="d")
    with pytest.raises(HostfileError, match="no host"):
        select_hosts(hosts, exclude="a,b,c")


def test_check_host_rejects_shell_syntax():
    for bad in ["a b", "a;b", "$(id)", "-oProxyCommand=x", "a/b", ""]:
        with pytest.raises(HostfileError):
            check_host(bad)
    assert check_host("node-01.cluster.local") == "node-01.cluster.local"


def test_is_local():
    assert is_local("localhost") and is_local("127.0.0.2")
    assert not is_local("192.0.2.1")  # TEST-NET-1, never assigned here
    assert not is_local("no-such-host.invalid")


# ---- jobs, env, quoting -----------------------------------------------------------------------------------

def test_parse_job_kinds():
    m = parse_job(["python", "-u", "-m", "pretrain", "train", "debug_cpu", "a.b=1"])
    assert m == Job("module", "pretrain", ("train", "debug_cpu", "a.b=1"))
    assert m.torchrun_args() == ["-m", "pretrain", "train", "debug_cpu", "a.b=1"]
    assert m.deepspeed_args() == ["--no_local_rank", "--module", "pretrain", "train", "debug_cpu", "a.b=1"]
    assert m.argv()[0] == sys.executable
    s = parse_job([sys.executable, "train.py", "--x"])
    assert s.torchrun_args() == ["train.py", "--x"] and s.deepspeed_args() == ["--no_local_rank", "train.py", "--x"]
    p = parse_job(["bash", "run.sh"])
    assert p.torchrun_args() == ["--no-python", "bash", "run.sh"] and p.argv() == ["bash", "run.sh"]
    with pytest.raises(LaunchError, match="python -m MODULE"):
        parse_job(["python", "-c", "print(1)"])
    with pytest.raises(LaunchError, match="after '--'"):
        parse_job([])


def test_env_propagation():
    environ = {"NCCL_SOCKET_IFNAME": "^lo,docker0", "OMP_NUM_THREADS": "4", "PYTHONPATH": "/src", "HOME": "/root",
               "CUDA_VISIBLE_DEVICES": "0", "GLOO_SOCKET_IFNAME": "eth1"}
    env = propagated_env(parse_env(["A=1", "OMP_NUM_THREADS=2", "B=x=y"]), environ)
    assert env == {"NCCL_SOCKET_IFNAME": "^lo,docker0", "OMP_NUM_THREADS": "2", "PYTHONPATH": "/src",
                   "GLOO_SOCKET_IFNAME": "eth1", "PYTHONUNBUFFERED": "1", "A": "1", "B": "x=y"}
    for bad in ["NOVALUE", "1A=2", "A-B=1", "=x"]:
        with pytest.raises(LaunchError, match="NAME=VALUE"):
            parse_env([bad])


def test_payload_crosses_a_shell_as_safe_characters():
    payload = encode_payload(["prog", *NASTY], {"V": NASTY[2]}, "/x y")
    assert set(payload) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    assert decode_payload(payload) == {"argv": ["prog", *NASTY], "env": {"V": NASTY[2]}, "cwd": "/x y"}


def test_ssh_remote_line_is_executed_as_data(tmp_path):
    """sshd runs the remote line with `sh -c`: every argument must arrive unchanged and nothing else run."""
    remote = ["env", f"--chdir={tmp_path}", f"V={NASTY[1]}", sys.executable, "-c",
              "import json,os,sys; print(json.dumps([sys.argv[1:], os.environ['V']]))", *NASTY]
    argv = ssh_argv("node-1", remote)
    assert argv[:2] == ["ssh", "-o"] and argv[-3:-1] == ["node-1", "--"]
    out = subprocess.run(["sh", "-c", argv[-1]], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert json.loads(out.stdout) == [NASTY, NASTY[1]]
    assert not list(tmp_path.glob("PWNED*"))


# ---- sbatch and accelerate files --------------------------------------------------------------------------

def test_sbatch_script(tmp_path):
    spec = SbatchSpec(nodes=2, job=["python", "-m", "pretrain", "train", "L16", NASTY[1]], run_dir=tmp_path / "run",
                      gpus_per_node=8, time="04:00:00", partition="gpu", account="proj", env={"V": NASTY[2]},
                      extra=["--qos=high", "--exclusive"], master_port=29600)
    text = sbatch_script(spec, cwd=str(tmp_path))
    directives = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
    for want in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=04:00:00", "--partition=gpu",
                 "--account=proj", "--requeue", "--signal=B:USR1@300", "--qos=high", "--exclusive",
                 f"--output={tmp_path}/run/logs/slurm-%j.out"]:
        assert f"#SBATCH {want}" in directives
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    export = next(ln for ln in text.splitlines() if ln.startswith("export V="))
    assert shlex.split(export) == ["export", f"V={NASTY[2]}"]
    last = shlex.split(text.splitlines()[-1])
    assert last[:5] == ["exec", sys.executable, "-u", "-m", "launch"] and "--launcher=slurm" in last
    assert "--nproc-per-node=8" in last and "--master-port=29600" in last and "--requeue-on-usr1" in last
    assert last[last.index("--") + 1:] == spec.job
    with pytest.raises(LaunchError, match="plain token"):
        sbatch_script(SbatchSpec(nodes=1, job=JOB, run_dir=tmp_path, partition="gpu\n#SBATCH --uid=0"))
    with pytest.raises(LaunchError, match=r"--run-dir '.*/a b' has spaces .* `#SBATCH --output`"):
        sbatch_script(SbatchSpec(nodes=1, job=JOB, run_dir=tmp_path / "a b"))


def test_accelerate_config_loads_in_accelerate(tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    hosts = [Host("node1", 8), Host("node2", 8)]
    path = write_config(tmp_path / "acc.yaml", accelerate_config(hosts, "node1", 29700))
    cfg = ClusterConfig.from_yaml_file(str(path))
    assert (cfg.num_machines, cfg.num_processes, cfg.main_process_ip, cfg.main_process_port) == (2, 16, "node1", 29700)
    assert str(cfg.distributed_type).endswith("MULTI_GPU") and cfg.mixed_precision == "bf16"
    cmds = accelerate_commands(path, hosts, parse_job(["python", "-m", "finetune", "train", "x"]))
    assert [c[c.index("--machine_rank") + 1] for c in cmds] == ["0", "1"]
    assert cmds[1][-4:] == ["-m", "finetune", "train", "x"]
    with pytest.raises(ValueError, match="same number of processes"):
        accelerate_config([Host("a", 8), Host("b", 4)], "a", 1)


# ---- preflight --------------------------------------------------------------------------------------------

def test_preflight_lines(tmp_path):
    info = probe_info("127.0.0.1", free_port())
    assert info["port_free"] is True and info["torch"] and info["code"]
    hosts = [Host("a", 2), Host("b", 2)]
    other = {**info, "torch": "0.0.1"}
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"splits": {"train": {"shards": [{"name": f"s{i}"} for i in range(6)]}}}))
    facts = JobFacts(dataset=Fact(str(ds), "--dataset"), workers=Fact(2, "--workers"),
                     global_batch=Fact(30, "--global-batch"), micro_batch=Fact(4, "--micro-batch"))
    fails, notes = evaluate(hosts, [Probe("a", info=info), Probe("b", info=other)], "a", 1, facts)
    text = "\n".join(fails)
    assert "torch differs across nodes: a=" in text and "b=0.0.1" in text
    assert "has 6 train shards, fewer than nodes x GPUs x workers = 2 x 2 x 2 = 8" in text
    assert "data.resampled=true" in text
    assert "not divisible" in text and notes == ["no GPU on any node: ranks run on CPU with gloo"]
    fails, _ = evaluate(hosts, [Probe("a", info={**info, "gpus": 1}), Probe("b", error="unreachable over ssh (x)")],
                        "a", 1)
    assert fails == ["host b: unreachable over ssh (x)",
                     "host a has 1 GPUs but slots=2; lower its slots or fix the node"]


# ---- bad input through the CLI: a clear error and nothing started -----------------------------------------

def _marker_job(tmp_path):
    script = tmp_path / "mark.py"
    script.write_text("import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('ran')\n")
    return ["--", "python", str(script), str(tmp_path / "RAN")]


def test_cli_bad_hostfile_runs_nothing(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=1\nnode2;touch${IFS}" + str(tmp_path / "PWNED") + " slots=1\n")
    r = launch(["run", "--hostfile", str(hf), "--run-dir", str(tmp_path / "run"), *_marker_job(tmp_path)], 60)
    assert r.returncode == 2 and f"{hf} line 2" in r.stderr and "not a valid host name" in r.stderr
    assert not (tmp_path / "RAN").exists() and not (tmp_path / "PWNED").exists()


def test_cli_busy_port_and_unreachable_host_run_nothing(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=1\nno-such-node.invalid slots=1\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = launch(["run", "--hostfile", str(hf), "--master-addr", "127.0.0.1", "--master-port", str(port),
                    "--run-dir", str(tmp_path / "run"), *_marker_job(tmp_path)], 90)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("preflight: FAIL")]
    assert r.returncode == 2, r.stdout + r.stderr
    assert any("host no-such-node.invalid: unreachable over ssh" in ln for ln in lines), lines
    assert any(f"master port {port} on 127.0.0.1 is already in use" in ln for ln in lines), lines
    assert "nothing was started" in r.stdout and not (tmp_path / "RAN").exists()


# ---- real runs on loopback --------------------------------------------------------------------------------

@pytest.fixture
def two_local_nodes(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("localhost slots=1\n127.0.0.2 slots=1\n")
    return hf


def test_torchrun_two_nodes_loopback(tmp_path, two_local_nodes):
    run = tmp_path / "run"
    r = launch(["run", "--hostfile", str(two_local_nodes), "--launcher", "torchrun", "--master-port", str(free_port()),
                "--run-dir", str(run), "--", *JOB, "--timeout", "30"], 150)
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = rank_lines(r.stdout)
    assert sorted(x["rank"] for x in ranks) == [0, 1] and {x["rank_sum"] for x in ranks} == {1}
    assert "preflight: ok (2 nodes, 2 processes)" in r.stdout
    logged = [rank_lines((run / "logs" / f"node-{i}.log").read_text()) for i in (0, 1)]
    assert all(len(x) == 1 for x in logged) and sorted(x[0]["rank"] for x in logged) == [0, 1]


def test_deepspeed_no_ssh_one_launcher_per_node(tmp_path, two_local_nodes):
    """What a cluster without ssh does: each node runs its own `--launcher nossh --node-rank i`."""
    run, port = tmp_path / "run", free_port()
    common = ["run", "--hostfile", str(two_local_nodes), "--launcher", "nossh", "--master-port", str(port),
              "--run-dir", str(run), "--no-check"]
    dry = launch([*common, "--dry-run", "--", *JOB], 60)
    assert dry.stdout.count("--no_ssh") == 2 and "--node_rank=0" in dry.stdout and "--node_rank=1" in dry.stdout
    procs = [subprocess.Popen(["timeout", "-k", "5", "150", sys.executable, "-m", "launch", *common, "--node-rank",
                               str(i), "--", *JOB, "--timeout", "30"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
             for i in (0, 1)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ranks = [x for o in outs for x in rank_lines(o)]
    assert sorted((x["rank"], x["launcher"], x["world_size"]) for x in ranks) == [(0, "deepspeed", 2),
                                                                                 (1, "deepspeed", 2)]
