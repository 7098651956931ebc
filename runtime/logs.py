"""Rank-0 logging: console + `log.txt`, and a TensorBoard writer (the default tracker) that exists only on rank 0.

Other ranks log warnings and errors only, prefixed with their rank, so a multi-node console stays
readable and a failing rank still says why.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from runtime.dist import DistEnv

LOGGER_NAME = "vitscale"


def setup_logging(env: DistEnv, run_dir: str | os.PathLike | None = None, level: int = logging.INFO) -> logging.Logger:
    """Configure and return the `vitscale` logger for this rank."""
    log = logging.getLogger(LOGGER_NAME)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    log.propagate = False
    prefix = "" if env.world_size == 1 else f"[rank {env.rank}] "
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if env.is_main:
        log.setLevel(level)
        if run_dir is not None:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(Path(run_dir) / "log.txt")
            file.setFormatter(fmt)
            log.addHandler(file)
    else:
        log.setLevel(logging.WARNING)
    return log


def get_logger() -> logging.Logger:
    """The project logger (configure it once with `setup_logging`)."""
    return logging.getLogger(LOGGER_NAME)


class TBWriter:
    """TensorBoard scalars/images/hparams, written by rank 0 only; every call is a no-op elsewhere.

    An experiment tracker (trainer/trackers.py): the config given to `log_params` is written at `close` as
    hparams, beside the last value logged of each of `hparam_metrics` (TensorBoard pairs them in one table).
    """

    def __init__(self, log_dir: str | os.PathLike, enabled: bool = True,
                 hparam_metrics: tuple[str, ...] = ("eval/top1", "eval/top5")):
        self._w = None
        self._params: dict[str, Any] | None = None
        self._final: dict[str, float] = {}
        self._hparam_metrics = hparam_metrics
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow, rank 0 only

            self._w = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        return self._w is not None

    def log_scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Log each `tag: value` at `step`; None values are left out."""
        if self._w is not None:
            for tag, v in values.items():
                if v is not None:
                    self._w.add_scalar(tag, float(v), step)
                    if tag in self._hparam_metrics:
                        self._final[tag] = float(v)

    def log_image(self, tag: str, img: Any, step: int) -> None:
        """Log a (C, H, W) image tensor."""
        if self._w is not None:
            self._w.add_image(tag, img, step)

    def log_params(self, params: dict[str, Any]) -> None:
        """Keep flat hyper-parameters, written with the final metrics at `close`."""
        self._params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}

    def close(self, ok: bool = True) -> None:
        """Write the hparams (if given; the first metric as NaN when none was logged) and close the file."""
        if self._w is not None:
            if self._params is not None:
                from torch.utils.tensorboard.summary import hparams

                final = self._final or {self._hparam_metrics[0]: float("nan")}
                # the three hparams summaries only: `add_hparams` would also write each metric once more as a
                # scalar at step 0, a stray point on the run's own eval/top1 curve
                writer = self._w._get_file_writer()
                for summary in hparams(self._params, final):
                    writer.add_summary(summary)
            self._w.close()
            self._w = None
