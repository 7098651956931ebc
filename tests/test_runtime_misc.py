"""Meters, rank-0 logging/TensorBoard, atomic writes and one-write console lines."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from runtime.dist import DistEnv
from runtime.io import atomic_path, atomic_write, atomic_write_json
from runtime.logs import TBWriter, setup_logging
from runtime.meters import ThroughputMeter, peak_flops


def test_peak_flops_by_device_name() -> None:
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None
    assert peak_flops("cpu", override_tflops=2.0) == 2e12


def test_meter_mfu_and_data_wait() -> None:
    meter = ThroughputMeter(flops_per_image=1e9, world_size=2, peak_flops_per_device=1e12)
    for _ in range(3):
        meter.start_wait()
        time.sleep(0.02)
        meter.end_wait()
        time.sleep(0.02)
        meter.end_step(images=64)
    s = meter.summary()
    assert 0.35 < s["data_wait_share"] < 0.65
    assert s["img_per_s_per_device"] == pytest.approx(s["img_per_s"] / 2)
    assert s["mfu"] == pytest.approx(s["img_per_s_per_device"] * 1e9 / 1e12)
    assert 0.03 < s["step_time"] < 0.1
    assert meter.images == 0  # summary resets the window


def test_atomic_write_never_leaves_partial_files(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert (tmp_path / "a" / "x.json").read_text() == '{\n  "k": 1\n}\n'
    atomic_write(tmp_path / "a" / "x.json", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a" / "x.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert (tmp_path / "a" / "x.json").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.json"]


def test_logging_and_tensorboard_on_rank_zero_only(tmp_path: Path, capsys) -> None:
    log = setup_logging(DistEnv(rank=0, world_size=2), tmp_path)
    log.info("hello from zero")
    assert "hello from zero" in (tmp_path / "log.txt").read_text()
    log = setup_logging(DistEnv(rank=1, world_size=2), tmp_path / "r1")
    log.info("quiet")
    log.warning("loud")
    out = capsys.readouterr().out
    assert "[rank 1] loud" in out and "quiet" not in out
    assert not (tmp_path / "r1" / "log.txt").exists()
    logging.getLogger("vitscale").handlers.clear()

    tb = TBWriter(tmp_path / "tb", enabled=True)
    tb.log_scalars(1, {"train/loss": 1.5, "train/mfu": None})
    tb.log_scalars(6, {"eval/top1": 0.25})
    tb.log_params({"optim.lr": 1e-3, "model.variant": "B/16"})
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval/top1", "train/loss"]
    assert acc.Scalars("train/loss")[0].value == 1.5
    # the hparams table pairs the config with the final top-1, and adds no point to the curve (once at step 0)
    assert [(e.step, e.value) for e in acc.Scalars("eval/top1")] == [(6, 0.25)]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["optim.lr"].number_value == 1e-3 and start.hparams["model.variant"].string_value == "B/16"
    off = TBWriter(tmp_path / "tb_off", enabled=False)
    off.log_scalars(0, {"x": 1.0})
    assert not off.enabled and not (tmp_path / "tb_off").exists()


def test_ranks_error_lines_never_run_together() -> None:
    """Every rank prints its error line to one shared, unbuffered console (the launcher runs `python -u`):
    each line must reach it whole, or a two-rank stop reads as one garbled line."""
    import os
    import subprocess
    import sys

    prog = ("from trainer.cli import run_verb\nfrom trainer.errors import CheckpointError\n"
            "def stop():\n    raise CheckpointError('checkpoint global_step20 could not be written (rank {r}: "
            + "ENOSPC " * 60 + ")')\nfor _ in range(400):\n    run_verb(stop)\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", prog.format(r=r)], stdout=write, stderr=write, env=env)
             for r in range(2)]
    os.close(write)
    with os.fdopen(read) as pipe:
        lines = pipe.read().splitlines()
    assert [p.wait() for p in procs] == [0, 0]
    assert len(lines) == 800
    assert all(x.startswith("error: checkpoint global_step20") and x.count("error:") == 1 for x in lines)
