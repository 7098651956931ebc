"""launch: the job after `--` (a stage's recipe) is loaded and its facts checked before anything is written or
started; `python -m launch` run in this process, so a started process would be seen."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port
from tests.launch_fixtures import counted_dataset


def _main(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`python -m launch ARGV` in this process: (exit code, stdout, stderr); it must start no process."""
    import psutil

    from launch.__main__ import main

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = main(argv)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before, "a process was started"
    out, err = capsys.readouterr()
    return code, out, err


def test_stage_train_keeps_train_options_out_of_the_overrides():
    from launch.commands import parse_job
    from launch.jobcheck import stage_train

    job = parse_job(["python", "-m", "finetune", "train", "--allow-changed", "debug_cpu", "init=w", "--allow-changed"])
    assert stage_train(job) == ("finetune", "debug_cpu", ["init=w"])


@pytest.mark.parametrize("verb", [["run", "--launcher", "local"], ["sbatch", "--nodes", "2", "--gpus-per-node", "0"],
                                  ["run", "--launcher", "nossh", "--dry-run"]])
@pytest.mark.parametrize("job,want", [
    (["pretrain", "train", "vit_l16_in2"], "no recipe 'vit_l16_in2': did you mean vit_l16_in21k"),
    (["pretrain", "train", "debug_cpu", "optim.lrr=1"], "unknown config key 'optim.lrr': did you mean 'optim.lr'"),
    (["finetune", "train", "debug_cpu", "init=x", "train.steps=ten"], "train.steps"),
    (["pretrain", "train", "debug_cpu", "run.dir="], "run.dir is required"),
    (["pretrain", "train", "debug_cpu", "--allow-change"], "unknown option --allow-change"),
])
def test_cli_bad_recipe_refused_before_anything(tmp_path, capsys, verb, job, want):
    hf = tmp_path / "hosts"
    hf.write_text("node-a slots=1\nnode-b slots=1\n")
    run = tmp_path / "run"
    hosts = ["--hostfile", str(hf)] if "nossh" in verb else []
    code, out, err = _main(capsys, [*verb, *hosts, "--run-dir", str(run), "--", "python", "-m", *job[:3],
                                    f"data.path={counted_dataset(tmp_path)}", f"run.dir={tmp_path / 'r'}", *job[3:]])
    assert code == 2 and not out, out
    assert err.count("\n") == 1 and err.startswith(f"launch: error: python -m {job[0]} train {job[2]}: "), err
    assert want in err and not run.exists()


@pytest.mark.parametrize("flags,overrides,want", [
    (["--nodes", "4"], [], "dataset DS (data.path) has 3 train shards, fewer than nodes x GPUs x workers = 4 x 1 x 1"),
    (["--nodes", "2"], ["data.workers=2"], "has 3 train shards, fewer than nodes x GPUs x workers = 2 x 1 x 2 = 4"),
    (["--nodes", "3"], [], "global batch 32 is not divisible by micro-batch 8 x world size 3"),
    (["--nodes", "2", "--micro-batch", "5"], [], "global batch 32 is not divisible by micro-batch 5 x world size 2"),
    (["--nodes", "2"], ["data.path=nowhere/dataset.json"], "dataset nowhere/dataset.json (data.path) does not exist"),
])
def test_cli_sbatch_checks_the_recipe_facts(tmp_path, capsys, flags, overrides, want):
    run, ds = tmp_path / "run", counted_dataset(tmp_path)
    code, out, _ = _main(capsys, ["sbatch", "--gpus-per-node", "0", "--run-dir", str(run), *flags, "--", "python",
                                  "-m", "pretrain", "train", "debug_cpu", f"data.path={ds}", "run.dir=r", *overrides])
    lines = [ln for ln in out.splitlines() if ln.startswith("preflight: FAIL")]
    assert code == 2 and len(lines) == 1 and want.replace("DS", ds) in lines[0], out
    assert "no batch script was written" in out and not run.exists()


def test_cli_sbatch_good_recipe_writes_the_script(tmp_path, capsys):
    run, ds = tmp_path / "run", counted_dataset(tmp_path)
    job = [sys.executable, "-m", "pretrain", "train", "debug_cpu", f"data.path={ds}", "run.dir=r"]
    code, out, _ = _main(capsys, ["sbatch", "--nodes", "2", "--gpus-per-node", "0", "--run-dir", str(run),
                                  "--micro-batch", "16", "--", *job])
    assert code == 0, out
    summary = next(ln for ln in out.splitlines() if ln.startswith("preflight: ok"))
    assert summary == (f"preflight: ok (2 nodes x 1 processes); dataset={ds} (data.path), split=train "
                       "(data.train_split), workers=1 (data.workers), global_batch=32 (train.global_batch), "
                       "micro_batch=16 (--micro-batch)")
    last = shlex.split((run / "sbatch.sh").read_text().splitlines()[-1])
    assert last[last.index("--") + 1:] == job  # the job as given: --micro-batch only fed preflight


def test_cli_nossh_dry_run_prints_every_node(tmp_path, capsys):
    hf = tmp_path / "hosts"
    hf.write_text("node-a slots=2\nnode-b slots=2\n")
    common = ["run", "--hostfile", str(hf), "--launcher", "nossh", "--run-dir", str(tmp_path / "run")]
    ds = counted_dataset(tmp_path)
    job = ["--", "python", "-m", "pretrain", "train", "debug_cpu", f"data.path={ds}", "run.dir=r"]
    code, out, _ = _main(capsys, [*common, "--dry-run", *job])
    assert code == 0, out
    heads = [ln for ln in out.splitlines() if ln.startswith("# ")]
    assert heads == ["# node 0 (node-a, ranks 0-1)", "# node 1 (node-b, ranks 2-3)"]
    cmds = [shlex.split(ln) for ln in out.splitlines() if not ln.startswith("# ")]
    assert [[a for a in c if a.startswith("--node_rank=")] for c in cmds] == [["--node_rank=0"], ["--node_rank=1"]]
    assert all(c[-4:] == job[-4:] and "--no_ssh" in c for c in cmds)
    code, _, err = _main(capsys, [*common, *job])  # for real: this machine is neither node
    assert code == 2 and "host node-a is not this machine" in err and "'--node-rank 0' on that node" in err


@pytest.mark.parametrize("job", [["python", "my_script.py", "--x"], ["python", "-m", "pretrain", "export", "RUN"],
                                 ["bash", "-c", "exit 0"]])
def test_cli_other_commands_pass_through_unchecked(tmp_path, capsys, job):
    code, out, _ = _main(capsys, ["run", "--launcher", "local", "--dry-run", "--run-dir", str(tmp_path / "run"), "--",
                                  *job])
    assert code == 0 and shlex.split(out.splitlines()[1])[-len(job) + 1:] == job[1:], out
    code, out, _ = _main(capsys, ["sbatch", "--nodes", "2", "--run-dir", str(tmp_path / "run"), "--", *job])
    assert code == 0 and "preflight" not in out and (tmp_path / "run" / "sbatch.sh").is_file(), out


def test_recipe_loading_imports_no_torch():
    """The launcher reads recipes on the login node in a fraction of a second: no torch behind the config."""
    # ... and the stages' `config` verb (its CLI, whose error contract names run errors) likewise
    code = ("import sys, io, contextlib, launch.jobcheck, pretrain.config, finetune.config, pretrain.__main__ as p, "
            "finetune.__main__ as f\nwith contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    assert p.main(['config', 'debug_cpu', '--yaml']) == 0 and f.main(['config', 'debug_cpu']) == 0\n"
            "assert 'run.seed' in out.getvalue()\n"
            "bad = [m for m in ('torch', 'webdataset', 'deepspeed') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cli_run_missing_dataset_starts_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = _main(capsys, ["run", "--launcher", "local", "--master-port", str(free_port()), "--run-dir",
                                  str(run), "--", "python", "-m", "pretrain", "train", "debug_cpu",
                                  "data.path=nowhere", "run.dir=r"])
    assert code == 2 and "preflight: FAIL dataset nowhere (data.path) does not exist" in out, out
    assert "nothing was started" in out and not run.exists()


def test_cli_check_uses_the_recipe_facts_and_flags_override(tmp_path, capsys):
    common = ["check", "--launcher", "local", "--nproc-per-node", "2", "--master-port", str(free_port())]
    ds = counted_dataset(tmp_path)
    job = ["--", "python3", "-m", "pretrain", "train", "debug_cpu", f"data.path={ds}", "run.dir=r"]
    code, out, _ = _main(capsys, [*common, *job])
    assert code == 0 and "preflight: ok (1 node, 2 processes); dataset=" in out, out
    assert "workers=1 (data.workers), global_batch=32 (train.global_batch), micro_batch=8 (train.micro_batch)" in out
    code, out, _ = _main(capsys, [*common, "--workers", "2", *job])
    assert code == 1 and "has 3 train shards, fewer than nodes x GPUs x workers = 1 x 2 x 2 = 4" in out, out
    assert "workers=2 (--workers)" in out
