"""Experiment trackers: where the Monitor's scalars, config and images go (rank 0 only).

`log.trackers` names them: `tensorboard` (the default, runtime.logs.TBWriter, a core dependency), `wandb` and
`mlflow` (pip extras). Each is one small interface, `Tracker`; the Monitor talks only to a list of them. A
tracker asked for but not installed is bad input, found at preflight before anything is started or written
(`missing_trackers`). See docs/architecture.md.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.config import to_dict
from runtime.logs import TBWriter

# tracker -> (the module it needs, the pip extra that installs it); tensorboard is a core dependency
REQUIRES = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}
# what to check when a tracker was installed but could not start
START_HINTS = {"wandb": "log in with `wandb login`, or set WANDB_MODE=offline (or disabled)",
               "mlflow": "check MLFLOW_TRACKING_URI (unset: a file store in RUN_DIR/mlruns)"}


class Tracker(Protocol):
    """One experiment tracker of a run (rank 0 only)."""

    def log_scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Log each `tag: value` at `step`; None values are left out."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the run's flat config (`section.key: value`), once, at the start."""

    def log_image(self, tag: str, img: Any, step: int) -> None:
        """Log a uint8 (3, H, W) image."""

    def close(self, ok: bool = True) -> None:
        """Flush and end the run (`ok`: it finished; else it stopped on an error or a signal). Idempotent."""


def missing_trackers(names: list[str]) -> list[str]:
    """One problem line (with the fix) per tracker asked for whose library is not installed."""
    problems = []
    for name in dict.fromkeys(names):
        if name in REQUIRES and importlib.util.find_spec(REQUIRES[name][0]) is None:
            problems.append(f"log.trackers: {name} is not installed; install it with "
                            f"`pip install -e .[{REQUIRES[name][1]}]` (or drop {name} from log.trackers)")
    return problems


def flat_params(cfg) -> dict[str, Any]:
    """The config as `section.key: value` (top-level values as they are; deeper sections as one value)."""
    out: dict[str, Any] = {}
    for sec, d in to_dict(cfg).items():
        if isinstance(d, dict):
            out.update({f"{sec}.{k}": v for k, v in d.items()})
        else:
            out[sec] = d
    return out


def hwc_uint8(img: Any) -> np.ndarray:
    """A (3, H, W) image tensor or array as a uint8 (H, W, 3) array (what wandb and mlflow take)."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    return np.ascontiguousarray(a.transpose(1, 2, 0)).astype(np.uint8, copy=False)


def _scalars(values: dict[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if v is not None}


class WandbTracker:
    """Weights & Biases: in the mode the environment sets (WANDB_MODE: online, offline, disabled); its files
    in RUN_DIR/wandb; project `log.project`, run name = the run dir's name."""

    def __init__(self, project: str, run_dir: Path):
        import wandb

        self._wandb = wandb
        self._run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir))

    def log_scalars(self, step: int, values: dict[str, float | None]) -> None:
        self._run.log(_scalars(values), step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        self._run.config.update(params, allow_val_change=True)

    def log_image(self, tag: str, img: Any, step: int) -> None:
        self._run.log({tag: self._wandb.Image(hwc_uint8(img))}, step=step)

    def close(self, ok: bool = True) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if ok else 1)
            self._run = None


class MlflowTracker:
    """MLflow: the server or store of MLFLOW_TRACKING_URI, else a file store in RUN_DIR/mlruns; experiment
    `log.project`, run name = the run dir's name."""

    def __init__(self, experiment: str, run_dir: Path):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses a file store unless asked for it; a database store needs the full mlflow package
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = MlflowClient(tracking_uri=uri)
        exp = self._client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
        self._run_id: str | None = self._client.create_run(exp_id, run_name=run_dir.name).info.run_id

    def log_scalars(self, step: int, values: dict[str, float | None]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self._run_id, metrics=[Metric(k, v, now, step) for k, v in _scalars(values).items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]  # MLflow's limit on a value's length
        for i in range(0, len(items), 100):  # and on the params of one call
            self._client.log_batch(self._run_id, params=items[i:i + 100])

    def log_image(self, tag: str, img: Any, step: int) -> None:
        self._client.log_image(self._run_id, hwc_uint8(img), key=tag, step=step)

    def close(self, ok: bool = True) -> None:
        if self._run_id is not None:
            self._client.set_terminated(self._run_id, status="FINISHED" if ok else "FAILED")
            self._run_id = None


def start_trackers(log_cfg, run_dir: Path) -> list[Tracker]:
    """Start the trackers `log_cfg.trackers` names (call on rank 0 only). A tracker that cannot start raises
    RuntimeError with one line naming it and what to check; those already started are closed first."""
    started: list[Tracker] = []
    for name in dict.fromkeys(log_cfg.trackers):
        try:
            if name == "tensorboard":
                started.append(TBWriter(run_dir / "tb"))
            elif name == "wandb":
                started.append(WandbTracker(log_cfg.project, run_dir))
            else:
                started.append(MlflowTracker(log_cfg.project, run_dir))
        except Exception as err:  # an external library's own errors (auth, server, store): say which and why
            for t in started:
                t.close(ok=False)
            why = " ".join(str(err).split())[:300]
            raise RuntimeError(f"log.trackers: {name} could not start ({type(err).__name__}: {why}); "
                               f"{START_HINTS.get(name, 'check the run dir')}") from err
    return started
