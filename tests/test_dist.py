"""runtime.dist: launcher detection, batch arithmetic, and real 2-process gloo jobs via torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runtime.dist import DistEnv, accumulation_steps, detect, first_host
from tests.conftest import ROOT, ephemeral_low, free_port, run_torchrun


def test_plain_python_is_rank_zero_of_one() -> None:
    assert detect({}) == DistEnv()


def test_torchrun_env() -> None:
    env = detect({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                  "MASTER_ADDR": "node0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"})
    assert (env.rank, env.world_size, env.local_rank, env.node_rank, env.num_nodes) == (5, 8, 1, 1, 2)
    assert (env.master_addr, env.master_port, env.launcher) == ("node0", 1234, "torchrun")
    assert not env.is_main and env.is_distributed


def test_deepspeed_launcher_env() -> None:
    env = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
                  "CROSS_SIZE": "2"})
    assert (env.node_rank, env.num_nodes, env.local_world_size, env.launcher) == (1, 2, 2, "deepspeed")


def test_slurm_env() -> None:
    env = detect({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
                  "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[007-008]"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 8, 2, 4)
    assert (env.node_rank, env.num_nodes, env.master_addr, env.launcher) == (1, 2, "gpu007", "slurm")
    # a single-task allocation (sbatch running python directly) is not distributed
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv()


@pytest.mark.parametrize("nodelist,first", [("a1", "a1"), ("gpu[003-005,9],cpu1", "gpu003"), ("n[2,4]", "n2"),
                                            ("x-y01,x-y02", "x-y01")])
def test_first_host(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


def test_accumulation_arithmetic() -> None:
    assert accumulation_steps(4096, 32, 64) == 2
    with pytest.raises(ValueError, match=r"4000 is not divisible by micro-batch 32 x world size 64 = 2048.*2048"):
        accumulation_steps(4000, 32, 64)
    with pytest.raises(ValueError, match="positive"):
        accumulation_steps(0, 1, 1)


def _reports(out: str) -> list[dict]:
    return sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


def test_two_processes_one_node() -> None:
    proc = run_torchrun(["-m", "runtime", "dist-check", "--timeout", "60"], nproc=2)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    reports = _reports(out)
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["rank_sum"] == 1 and r["backend"] == "gloo" for r in reports)
    assert [r["local_rank"] for r in reports] == [0, 1] and {r["node_rank"] for r in reports} == {0}


def test_two_nodes_on_loopback() -> None:
    port = free_port()
    procs = [run_torchrun(["-m", "runtime", "dist-check"], nproc=1, nnodes=2, node_rank=n, port=port)
             for n in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    reports = _reports("\n".join(outs))
    assert [(r["rank"], r["node_rank"], r["local_rank"], r["num_nodes"]) for r in reports] == [
        (0, 0, 0, 2), (1, 1, 0, 2)]


GROUP_TIMEOUT = """
import sys, time, torch, torch.distributed as d
from pathlib import Path
from runtime.dist import init_distributed
done = Path(sys.argv[1])
env = init_distributed(timeout_s=3)
group = d.new_group(ranks=range(d.get_world_size()))  # made as DeepSpeed makes its ZeRO data-parallel group
if env.rank == 0:
    t0 = time.time()
    try:
        d.all_reduce(torch.ones(1), group=group)  # rank 1 never joins
        print("RESULT completed", flush=True)
    except RuntimeError:
        print(f"RESULT failed after {time.time() - t0:.1f} s", flush=True)
    finally:
        done.write_text("done")
else:
    # Alive, not joining, until rank 0 has its result: so rank 0 can only fail by the timeout, not because its
    # peer left. Rank 1 leaves after RANK1_LIMIT_S anyway, which the test's bound is far below.
    deadline = time.time() + RANK1_LIMIT_S
    while not done.exists() and time.time() < deadline:
        time.sleep(0.1)
"""

def test_groups_made_later_keep_the_timeout(tmp_path) -> None:
    """A subgroup (DeepSpeed's data-parallel group) fails within dist.timeout too, not torch's 30-minute default."""
    script = tmp_path / "group_timeout.py"
    script.write_text(GROUP_TIMEOUT.replace("RANK1_LIMIT_S", "120"))
    proc = run_torchrun([str(script), str(tmp_path / "rank0_done")], nproc=2, extra_env={"PYTHONPATH": str(ROOT)})
    out, _ = proc.communicate(timeout=300)
    result = [line for line in out.splitlines() if line.startswith("RESULT")]
    assert result and result[0].startswith("RESULT failed"), out[-3000:]
    # 3 s timeout (a few more on a loaded machine); a group on torch's 30-minute default would only fail when
    # rank 1 gives up waiting, after 120 s
    assert float(result[0].split()[3]) < 30, result


SINGLE = """
import os, torch, torch.distributed as d
from runtime.dist import init_distributed
env = init_distributed(single=True)
group = d.new_group(ranks=[0])  # as DeepSpeed makes its groups
t = torch.ones(2)
d.all_reduce(t, group=group)
print("RESULT", env.rank, d.get_world_size(), t.tolist(), "MASTER_PORT" in os.environ, flush=True)
os._exit(0)  # leave as a failed run does: no teardown
"""


def test_one_process_group_leaves_no_file_and_takes_no_port(tmp_path) -> None:
    """Every single-process run (debug_cpu, one-GPU fine-tunes) makes a group; it must not leave files in $TMPDIR,
    even when the process ends without tearing the group down."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "WORLD_", "LOCAL_"))}
    out = subprocess.run([sys.executable, "-c", SINGLE], capture_output=True, text=True, timeout=120,
                         env={**env, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT 0 1 [1.0, 1.0] False" in out.stdout, out.stdout
    assert sorted(p.name for p in tmp.iterdir()) == []


def test_test_ports_come_from_below_the_ephemeral_range(monkeypatch) -> None:
    """The suite's MASTER_PORTs: never one the kernel may hand to another socket meanwhile, never the same twice in
    a row of jobs, and the two workers' slices apart."""
    low = ephemeral_low()
    picks = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        picks[worker] = [free_port() for _ in range(50)]
    every = picks["gw0"] + picks["gw1"]
    assert len(set(every)) == 100 and all(1024 <= p < low for p in every), every
    assert max(picks["gw0"]) < min(picks["gw1"])
