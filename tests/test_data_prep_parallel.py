"""The same bytes whatever the parallelism: any --workers, a kill -9 or a Ctrl-C and a rerun, two nodes and a
merge."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from data_prep import merge, write_example_images, write_shards
from data_prep.__main__ import main
from data_prep.examples import write_odd_images
from data_prep.manifest import ManifestError
from tests.conftest import ROOT
from tests.data_prep_fixtures import data_prep_cli, kill_after_shards, output_files


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = write_example_images(tmp_path_factory.mktemp("d") / "src", "digits", per_class=30)
    write_odd_images(root)  # rejects of every kind, so they must come out the same too
    return root


def test_same_output_for_any_worker_count(digits, tmp_path):
    opts = dict(val_fraction=0.2, samples_per_shard=24, seed=3)
    one = write_shards(digits, tmp_path / "a" / "out", workers=1, **opts)
    two = write_shards(digits, tmp_path / "b" / "out", workers=2, **opts)
    assert one == two
    assert len(one["splits"]["train"]["shards"]) > 4 and one["rejects"]["count"] > 0
    assert output_files(tmp_path / "a" / "out") == output_files(tmp_path / "b" / "out")


def test_max_shard_bytes(digits, tmp_path):
    cap = 60_000
    m = write_shards(digits, tmp_path / "out", samples_per_shard=1000, max_shard_bytes=cap)
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["bytes"] <= cap for s in shards)
    assert m["splits"]["train"]["samples"] == 300 + 9  # digits + the odd images that are kept


def test_kill_9_then_rerun_is_byte_identical(tmp_path):
    src = write_example_images(tmp_path / "photos", "photos", per_class=60)
    args = ["--format", "webp", "--quality", "90", "--samples-per-shard", "4", "--seed", "5"]
    write_shards(src, tmp_path / "ref" / "out", format="webp", quality=90, samples_per_shard=4, seed=5)
    out = tmp_path / "run" / "out"
    proc = data_prep_cli(["write", str(src), str(out), "--workers", "2", *args])
    kill_after_shards(proc, out, random.randint(0, 6))  # once 0-6 shards are finished
    assert not (out / "dataset.json").exists()  # killed mid-run
    assert len(list(out.glob("*.tar"))) < 30
    assert main(["write", str(src), str(out), "--workers", "2", "--no-progress", *args]) == 0
    assert output_files(out) == output_files(tmp_path / "ref" / "out")
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_stops_the_workers_leaves_no_temporary_and_a_rerun_is_byte_identical(tmp_path, ctrl_c_default):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) mid-write: one line, exit 130, every
    worker gone, no `*.tmp` left (it was a KeyboardInterrupt traceback per process and half-written shards)."""
    src = write_example_images(tmp_path / "photos", "photos", per_class=60)
    args = ["--format", "webp", "--quality", "90", "--samples-per-shard", "4", "--seed", "5"]
    write_shards(src, tmp_path / "ref" / "out", format="webp", quality=90, samples_per_shard=4, seed=5)
    out = tmp_path / "run" / "out"
    proc = data_prep_cli(["write", str(src), str(out), "--workers", "2", *args])
    kill_after_shards(proc, out, random.randint(1, 6), signal.SIGINT)
    said = proc.stdout.read().strip().splitlines()
    assert proc.returncode == 130 and said[-1] == (
        "interrupted (Ctrl-C); the finished shards are kept: rerun the same command to resume"), said[-20:]
    assert not any("Traceback" in line for line in said), said[-20:]
    assert not [p.pid for p in psutil.process_iter() if _session(p) == proc.pid]  # the workers ended with it
    assert not list(out.rglob("*.tmp")) and not (out / "dataset.json").exists()
    assert main(["write", str(src), str(out), "--workers", "2", "--no-progress", *args]) == 0
    assert output_files(out) == output_files(tmp_path / "ref" / "out")


def _session(p: psutil.Process) -> int | None:
    try:
        return None if p.status() == psutil.STATUS_ZOMBIE else os.getsid(p.pid)
    except (psutil.Error, OSError):
        return None


def test_two_nodes_then_merge_equals_one_node(digits, tmp_path):
    opts = ["--val-fraction", "0.2", "--samples-per-shard", "16", "--seed", "11"]
    ref = write_shards(digits, tmp_path / "one" / "out", val_fraction=0.2, samples_per_shard=16, seed=11)
    out = tmp_path / "two" / "out"
    node0 = data_prep_cli(["write", str(digits), str(out), "--num-nodes", "2", "--node-rank", "0", *opts])
    # node 1 through the sbatch template, as task 4 of an array 3-4: rank and count come from SLURM's variables
    slurm = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "3",
             "SLURM_CPUS_PER_TASK": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    node1 = subprocess.Popen(["bash", "data_prep/slurm/write_shards.sbatch", str(digits), str(out), *opts], cwd=ROOT,
                             env={**os.environ, **slurm}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for proc in (node0, node1):
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log
        assert "merge" in log
    assert not (out / "dataset.json").exists()  # nodes never write the manifest
    names = [s["name"] for split in ref["splits"].values() for s in split["shards"]]
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(names)
    assert main(["merge", str(out)]) == 0
    assert output_files(out) == output_files(tmp_path / "one" / "out")


def test_merge_before_every_node_is_done_names_the_missing_shards(digits, tmp_path):
    report = write_shards(digits, tmp_path / "out", samples_per_shard=50, num_nodes=3, node_rank=1)
    assert report["shards"] == ["train-000001.tar", "train-000004.tar"] and report["written"] == 2
    with pytest.raises(ManifestError, match=r"5 of 7 shards are not finished \(e\.g\. train-000000\.tar"):
        merge(tmp_path / "out")
    with pytest.raises(ValueError, match="--node-rank 3"):
        write_shards(digits, tmp_path / "out", samples_per_shard=50, num_nodes=3, node_rank=3)


def test_node_defaults_from_a_slurm_array():
    from data_prep.writer import resolve_nodes

    array = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5"}
    assert resolve_nodes(None, None, array) == (2, 4)
    assert resolve_nodes(None, 3, array) == (3, 4)
    assert resolve_nodes(1, None, array) == (0, 1)  # explicit single node: the array is not ours
    assert resolve_nodes(None, None, {}) == (0, 1)


def test_temp_file_cleanup_touches_only_its_own_shards_on_a_node(tmp_path):
    from data_prep.writer import remove_temp_files

    names = ["a.tar.tmp", "b.tar.tmp", ".parts/shards/.a.tar.json.12.tmp", ".parts/shards/.b.tar.json.9.tmp",
             ".dataset.json.5.tmp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    remove_temp_files(tmp_path, ["a.tar"])  # a node of several: another node may be writing b.tar right now
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.tmp")) == sorted(
        [".dataset.json.5.tmp", ".parts/shards/.b.tar.json.9.tmp", "b.tar.tmp"])
    remove_temp_files(tmp_path)  # a single-node write owns the folder
    assert not list(tmp_path.rglob("*.tmp"))
