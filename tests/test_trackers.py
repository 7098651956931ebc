"""Experiment trackers (log.trackers): the Monitor, driven in-process for a few real steps of a tiny model, sends
the same scalars, config and image grid to TensorBoard, wandb (offline, read back from its run file) and MLflow
(a file store in the run dir, read back with MlflowClient); a tracker not installed is one line, exit 2."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
import torch

from runtime.config import ConfigError
from runtime.dist import DistEnv


def _config(run_dir: Path, *overrides: str):
    from pretrain.config import load_pretrain_config

    return load_pretrain_config("debug_cpu", ["data.path=unused", f"run.dir={run_dir}", "log.every=1", *overrides])


class _Backend:
    """What Monitor.log_train reads of a backend, over a real tiny model and optimizer."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(3 * 32 * 32, 10)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.device = torch.device("cpu")

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(self.model(images.float().flatten(1) / 255), labels)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def grad_norm(self) -> float:
        return float(torch.cat([p.grad.flatten() for p in self.model.parameters()]).norm())

    def loss_scale(self) -> None:
        return None


def _monitor(cfg, run_dir: Path, steps: int):
    from trainer.monitor import Monitor
    from vit import vit_config

    return Monitor(cfg, DistEnv(rank=0, world_size=1), vit_config("debug", image_size=32, num_classes=10), run_dir,
                   steps)


def _drive(cfg, run_dir: Path, steps: int = 3) -> list[float]:
    """A Monitor over `steps` optimizer steps of the tiny model (log every step, one eval at the end); returns
    the losses it logged."""
    run_dir.mkdir(parents=True, exist_ok=True)
    monitor = _monitor(cfg, run_dir, steps)
    backend, losses = _Backend(), []
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen)
        monitor.meter.start_wait()
        monitor.meter.end_wait()
        monitor.first_batch(images, step)
        loss = backend.step(images, torch.randint(0, 10, (8,), generator=gen))
        monitor.add_loss(loss)
        losses.append(loss.item())
        monitor.meter.end_step(8)
        monitor.log_train(backend, step + 1, 1e-3, 0, {"by_reason": {"decode": 0, "too_small": 2}})
    monitor.log_eval({"top1": 0.25, "top5": 0.75, "loss": 2.0, "samples": 8}, steps)
    monitor.close({"steps": steps})
    return losses


def wandb_records(run_dir: Path) -> list:
    """The records of the one offline wandb run under `run_dir`, read from its .wandb file (a LevelDB-style
    log of protobuf records: 32 KiB blocks, each record split into chunks with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, block, pos, chunk, records = Path(path).read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, size, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + size], pos + 7 + size
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_history(records: list) -> dict[int, dict]:
    """step -> {key: value} of the run's history rows."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


@pytest.mark.slow  # wandb starts its service processes (wandb-core, wandb-symon), even offline
def test_wandb_and_mlflow_get_what_tensorboard_gets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # the tracker sets it for its own file store
    run_dir = tmp_path / "run7"
    losses = _drive(_config(run_dir, "log.trackers=[tensorboard,wandb,mlflow]", "log.project=trk"), run_dir)

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tb_tags = set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert acc.Tags()["images"] == ["train/batch"]

    records = wandb_records(run_dir)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("trk", "run7")
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["optim.lr"] == 3e-3 and config["log.trackers"] == ["tensorboard", "wandb", "mlflow"]
    history = wandb_history(records)
    assert [history[s]["train/loss"] for s in (1, 2, 3)] == pytest.approx(losses)
    assert history[3]["eval/top1"] == 0.25 and history[1]["data/skipped_too_small"] == 2
    assert history[0]["train/batch/_type"] == "image-file"  # the first batch's grid, at step 0
    wandb_tags = {k for row in history.values() for k in row if not k.startswith("_") and "/batch/" not in k}
    assert wandb_tags == tb_tags, wandb_tags ^ tb_tags  # the same scalars (None ones left out by both)
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("trk").experiment_id])
    assert mrun.info.run_name == "run7" and mrun.info.status == "FINISHED"
    history = client.get_metric_history(mrun.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s + 1, pytest.approx(v)) for s, v in enumerate(losses)]
    assert set(mrun.data.metrics) == tb_tags
    assert mrun.data.params["optim.lr"] == "0.003" and mrun.data.params["precision"] == "bf16"
    assert client.list_artifacts(mrun.info.run_id, "images")  # the grid, as an MLflow image


def test_a_run_that_stops_is_ended_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    cfg = _config(run_dir, "log.trackers=[mlflow]")
    monitor = _monitor(cfg, run_dir, 3)
    monitor.close(None)  # what trainer/run.py does after an error or a signal
    monitor.close({"steps": 3})  # only the first close counts
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (mrun,) = client.search_runs([client.get_experiment_by_name("vitscale").experiment_id])
    assert mrun.info.status == "FAILED"


def test_a_tracker_that_cannot_start_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch-scheme://x")
    cfg = _config(tmp_path, "log.trackers=[tensorboard,mlflow]")
    with pytest.raises(ConfigError) as err:
        _monitor(cfg, tmp_path, 3)
    assert str(err.value).startswith("log.trackers: mlflow could not start (")
    assert "check MLFLOW_TRACKING_URI" in str(err.value) and "\n" not in str(err.value)


def test_a_tracker_not_installed_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from pretrain.__main__ import main
    from trainer import trackers

    monkeypatch.setitem(trackers.REQUIRES, "wandb", ("wandb_not_installed_here", "wandb"))
    run_dir = tmp_path / "r"
    args = ["train", "debug_cpu", f"data.path={tmp_path / 'nowhere.json'}", f"run.dir={run_dir}"]
    assert main([*args, "log.trackers=[tensorboard,wandb]"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: log.trackers: wandb is not installed; install it with `pip install -e .[wandb]` "
                   "(or drop wandb from log.trackers)\n")
    assert not run_dir.exists()  # found before anything was written
    assert main([*args, "log.trackers=[neptune]"]) == 2
    err = capsys.readouterr().err
    assert "log.trackers[0] must be one of 'tensorboard', 'wandb', 'mlflow', got 'neptune'" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("n", [1, 5, 8, 20])
def test_first_batch_grid_is_torchvisions_layout(n: int) -> None:
    import torchvision

    from trainer.monitor import image_grid

    images = torch.randint(0, 256, (n, 3, 6, 5), dtype=torch.uint8)
    assert torch.equal(image_grid(images, per_row=8), torchvision.utils.make_grid(images, nrow=8))
