"""Every CLI's numeric options: a value that cannot be meant (0 nodes, a port past 65535, a grid of -3 images, an
unknown variant) is one usage line naming the option, exit 2, and nothing is written. In-process: argparse
refuses before any verb runs."""

from __future__ import annotations

import argparse

import pytest

from data_prep.__main__ import main as data_prep_main
from data_prep.verify import stats_table
from launch.__main__ import main as launch_main
from launch.slurm import time_limit
from pretrain.__main__ import main as pretrain_main
from runtime.__main__ import main as runtime_main
from runtime.argtypes import at_least, number, port
from vit.__main__ import main as vit_main

JOB = ["--", "python", "-m", "pretrain", "train", "debug_cpu", "data.path=nowhere/dataset.json", "run.dir=RUN"]
MAINS = {"vit": vit_main, "pretrain": pretrain_main, "data_prep": data_prep_main, "runtime": runtime_main,
         "launch": launch_main}

# (CLI, argv; RUN is the test's folder, HOSTS its one-line hostfile) -> what the one line must name
BAD = [
    ("vit", "info L/16 --image-size 0", "argument --image-size: must be an integer >= 1, got '0'"),
    ("vit", "info L/16 --num-classes -1", "argument --num-classes: must be an integer >= 0"),
    ("vit", "info XL/16", "unknown ViT variant 'XL/16'"),
    ("vit", "info L/16 --image-size 383", "not a multiple of patch size 16"),
    ("vit", "inspect w.safetensors --n 0", "argument --n: must be an integer >= 1"),
    ("pretrain", "plan vit_h14_in21k --gpus 0", "argument --gpus: must be an integer >= 1, got '0'"),
    ("pretrain", "plan vit_h14_in21k --nodes -2", "argument --nodes: must be an integer >= 1"),
    ("pretrain", "plan vit_h14_in21k --gpu-mem -1", "argument --gpu-mem: must be a number > 0, got '-1'"),
    ("pretrain", "plan vit_h14_in21k --gpu-mem nan", "argument --gpu-mem: must be a number > 0, got 'nan'"),
    ("data_prep", "stats RUN --max-classes 0", "argument --max-classes: must be an integer >= 1"),
    ("data_prep", "preview RUN --out RUN/g.png --n -3", "argument --n: must be an integer >= 1, got '-3'"),
    ("data_prep", "verify RUN --workers 0", "argument --workers: must be an integer >= 1"),
    ("data_prep", "example RUN/ex --per-class 0", "argument --per-class: must be an integer >= 1"),
    ("data_prep", "example RUN/ex --size abc", "argument --size: must be an integer >= 1, got 'abc'"),
    ("data_prep", "write RUN/src RUN/out --num-nodes 0", "argument --num-nodes: must be an integer >= 1, got '0'"),
    ("runtime", "dist-check --timeout 0", "argument --timeout: must be a number > 0, got '0'"),
    ("runtime", "dist-check --hold -1", "argument --hold: must be a number >= 0"),
    ("launch", "sbatch --nodes 0 --run-dir RUN", "argument --nodes: must be an integer >= 1, got '0'"),
    ("launch", "sbatch --nodes 2 --gpus-per-node -1 --run-dir RUN", "argument --gpus-per-node: must be an "
     "integer >= 0"),
    ("launch", "sbatch --nodes 2 --signal-grace -5 --run-dir RUN", "argument --signal-grace: must be an integer >= 0"),
    ("launch", "sbatch --nodes 2 --master-port 70000 --run-dir RUN", "argument --master-port: must be a TCP port"),
    ("launch", "sbatch --nodes 2 --micro-batch 0 --run-dir RUN", "argument --micro-batch: must be an integer >= 1"),
    ("launch", "run --hostfile HOSTS --nproc-per-node 0 --run-dir RUN", "argument --nproc-per-node: must be an "
     "integer >= 1"),
    ("launch", "run --hostfile HOSTS --master-port 0 --run-dir RUN", "argument --master-port: must be a TCP port, "
     "1-65535, got '0'"),
    ("launch", "run --hostfile HOSTS --grace -1 --run-dir RUN", "argument --grace: must be a number >= 0"),
    ("launch", "run --hostfile HOSTS --node-rank 5 --dry-run --run-dir RUN", "--node-rank 5 is not a node of this "
     "job, which has 1: node rank 0"),
    ("launch", "run --hostfile HOSTS --launcher pdsh --node-rank 0 --dry-run --run-dir RUN", "--node-rank is for "
     "the per-node launchers"),
    ("launch", "check --hostfile HOSTS --ssh-port 65536", "argument --ssh-port: must be a TCP port"),
    ("launch", "check --hostfile /", "hostfile '/' is a folder, not a file; write one 'HOST slots=N' line"),
    ("launch", "sbatch --nodes 1 --time 1-00:00:00x --run-dir RUN", "argument --time: '1-00:00:00x' is not a SLURM "
     "time limit"),
    ("launch", "sbatch --nodes 1 --time 1:2:3:4 --run-dir RUN", "is not a SLURM time limit"),
    # the script's options are checked before the dataset (here: missing) is looked at
    ("launch", "sbatch --nodes 1 --env FOO --run-dir RUN", "--env 'FOO': expected NAME=VALUE"),
    ("launch", "sbatch --nodes 1 --sbatch-arg=nodash --run-dir RUN", "--sbatch-arg 'nodash': expected --option=value"),
]


@pytest.mark.parametrize("cli,argv,why", BAD, ids=[f"{c} {a.split(' --')[0]} {w[:24]}" for c, a, w in BAD])
def test_a_value_that_cannot_be_meant_is_one_usage_line(cli, argv, why, tmp_path, capsys):
    (tmp_path / "hosts").write_text("127.0.0.1 slots=2\n")
    args = [a.replace("RUN", str(tmp_path / "run")).replace("HOSTS", str(tmp_path / "hosts")) for a in argv.split()]
    if cli == "launch" and args[0] in ("run", "sbatch"):
        args += [a.replace("RUN", str(tmp_path / "run")) for a in JOB]
    with pytest.raises(SystemExit) as stop:
        code = MAINS[cli](args)
        raise SystemExit(code)  # the launcher's own refusals return 2 rather than exit
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert why in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_the_types_accept_their_boundaries_and_refuse_just_past_them():
    assert at_least(1)("1") == 1 and at_least(0)("0") == 0
    assert number(0)("0") == 0.0 and number(0, strict=True)("0.5") == 0.5
    assert port("1") == 1 and port("65535") == 65535
    for limit in ("90", "90:30", "24:00:00", "2-12", "2-12:30", "1-00:00:00", "UNLIMITED", "infinite"):
        assert time_limit(limit) == limit  # every form sbatch --time takes
    for parse, text in [(at_least(1), "0"), (at_least(0), "-1"), (at_least(1), "1.5"), (number(0), "-0.1"),
                        (number(0, strict=True), "0"), (number(0), "inf"), (port, "65536"), (port, "http")]:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            parse(text)


@pytest.mark.parametrize("rows,most,least", [(1, 1, 0), (3, 2, 1), (4, 2, 2), (9, 5, 4)])
def test_stats_shows_as_many_class_rows_as_asked(digits_shards, rows, most, least):
    """The histogram of a dataset with more classes than `--max-classes` rows shows exactly that many (it showed
    every class for 1, and one fewer for an odd number)."""
    text = stats_table(digits_shards.parent, rows)  # 10 classes
    assert f"(showing the {most} most and {least} least frequent classes)" in text
    table = text.split("frequent classes)\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]  # below the header
    assert len(table) == rows
    totals = [int(line.split()[1]) + int(line.split()[2]) for line in table]
    assert totals[:most] == sorted(totals[:most], reverse=True)
    assert min(totals[:most]) >= max(totals[most:], default=0)


def test_the_boundary_values_still_run(tmp_path, capsys):
    """The boundaries are not refusals: 1 GPU, node rank 0 of a one-node hostfile."""
    assert pretrain_main(["plan", "vit_l16_in21k", "--gpus", "1", "--gpu-mem", "141"]) == 0
    assert "ZeRO-1" in capsys.readouterr().out
    (tmp_path / "hosts").write_text("127.0.0.1 slots=2\n")
    assert launch_main(["run", "--hostfile", str(tmp_path / "hosts"), "--node-rank", "0", "--dry-run", "--run-dir",
                        str(tmp_path / "run"), "--", "python", "-m", "runtime", "dist-check"]) == 0
    assert "# node 0 (127.0.0.1" in capsys.readouterr().out
