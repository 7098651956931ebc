"""Progress of every long loop, in one place: a bar on a terminal, INFO lines in a run's log, one ETA format.

`progress_bar` is a tqdm bar that is drawn only on rank 0, only when stderr is a terminal and never when
progress is switched off (`--no-progress` on the verbs, or VITSCALE_NO_PROGRESS=1 in the environment): a
SLURM log file or a pipe gets no bar. Inside the trainers the log goes to files, so their evals report with
`LogProgress` instead: a line every ~10 %. Both show done/total, the rate and the ETA as `format_eta` writes it
('2d03h', '3h12m', '7m05s', '42s'), the same as the trainers' step lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable

from tqdm import tqdm

NO_PROGRESS_ENV = "VITSCALE_NO_PROGRESS"


def format_eta(seconds: float) -> str:
    """A duration for humans: '2d03h', '3h12m', '7m05s' or '42s' (negative counts as 0)."""
    s = int(max(0.0, seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def disable_progress() -> None:
    """Switch bars off for this process and those it starts (what `--no-progress` does)."""
    os.environ[NO_PROGRESS_ENV] = "1"


def add_progress_flag(parser) -> None:
    """`--no-progress` on a verb's argparse parser (read back with `apply_progress_flag`)."""
    parser.add_argument("--no-progress", dest="no_progress", action="store_true",
                        help=f"no progress bar (also: {NO_PROGRESS_ENV}=1; bars are drawn only on a terminal)")


def apply_progress_flag(args) -> None:
    """Switch bars off when the parsed `args` of a verb carry `--no-progress`."""
    if getattr(args, "no_progress", False):
        disable_progress()


def progress_allowed() -> bool:
    """Whether a bar may be drawn: rank 0, stderr a terminal, and VITSCALE_NO_PROGRESS unset (or 0)."""
    from runtime.dist import detect

    if os.environ.get(NO_PROGRESS_ENV, "0").strip() not in ("", "0"):
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) and detect().is_main


BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed_h}<{eta}, {rate_fmt}{item_rate}{postfix}]"


class _Bar(tqdm):
    """tqdm with our ETA format and an optional second rate (images per second beside batches per second)."""

    items = 0

    def update(self, n: float = 1, items: int = 0) -> bool | None:
        """Advance by `n` units; `items` (e.g. the images of a batch) feed the second rate."""
        self.items += items
        return super().update(n)

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        total, n, elapsed = d.get("total"), d.get("n") or 0, d.get("elapsed") or 0
        rate = d.get("rate") or (n / elapsed if n and elapsed else None)  # the smoothed rate, else the mean
        d["eta"] = format_eta((total - n) / rate) if rate and total else "?"
        d["elapsed_h"] = format_eta(elapsed)
        d["item_rate"] = f", {self.items / elapsed:.0f} img/s" if self.items and elapsed > 0 else ""
        return d


def progress_bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", enabled: bool = True) -> tqdm:
    """A progress bar over `iterable` (or `total` units fed by `.update(n)`) with rate and ETA; a no-op bar
    unless `enabled` and `progress_allowed()`. Use as a context manager or iterate it."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    show = enabled and progress_allowed()
    # a terminal that reports no size (0x0: a bare pty) would get no bar at all from tqdm: a fixed size there
    fixed = None if not show or _columns() else 100
    return _Bar(iterable, total=total, desc=desc, unit=unit, disable=not show, file=sys.stderr, mininterval=0.5,
                dynamic_ncols=fixed is None, ncols=fixed, nrows=fixed and 20, bar_format=BAR_FORMAT if total else None)


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class LogProgress:
    """A long loop's progress as INFO lines of the project log, at every ~`every` of `total`:
    `eval: 30/300 batches (10%) | 412 img/s | eta 1m05s` (logs under SLURM are files: no bar there).
    `ranks`: the images counted here times `ranks` make the img/s (every rank runs the same batches).
    `min_interval`: seconds since the previous line (or the start) before a mark is logged, so that a loop of a
    few seconds logs nothing but its result, while an eval of minutes still shows its ~10 % marks."""

    def __init__(self, total: int, desc: str, unit: str = "batches", every: float = 0.1, ranks: int = 1,
                 log: logging.Logger | None = None, min_interval: float = 0.0):
        from runtime.logs import get_logger

        self.total, self.desc, self.unit, self.every, self.ranks = total, desc, unit, every, ranks
        self.log, self.min_interval = log or get_logger(), min_interval
        self.done, self.items = 0, 0
        self._next = max(1.0, total * every)  # the first line at ~10 %: an ETA after one batch is noise
        self._t0 = self._last = time.perf_counter()

    def update(self, n: int = 1, items: int = 0) -> None:
        """Count `n` more units (and `items` images); log when the next ~10 % mark is passed."""
        self.done += n
        self.items += items
        if self.total <= 0 or self.done < self._next:
            return
        frac = min(1.0, self.done / self.total)
        marks = max(1, round(1 / self.every))
        self._next = min(self.total, (int(frac * marks) + 1) * self.total / marks)
        if self.done >= self.total:
            self._next = float("inf")
        now = time.perf_counter()
        if now - self._last < self.min_interval:
            return
        self._last, elapsed = now, now - self._t0
        rate = f" | {self.items * self.ranks / elapsed:.0f} img/s" if self.items and elapsed > 0 else ""
        eta = (self.total - self.done) * elapsed / self.done
        self.log.info(f"{self.desc}: {self.done}/{self.total} {self.unit} ({frac:.0%}){rate} | eta {format_eta(eta)}")

    def close(self) -> None:
        """Nothing to release (the same interface as a bar)."""

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
