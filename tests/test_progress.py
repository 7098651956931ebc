"""runtime/progress.py: the one ETA format, bars only on rank 0's terminal, eval progress as log lines."""

from __future__ import annotations

import logging
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from runtime.logs import get_logger
from runtime.progress import NO_PROGRESS_ENV, LogProgress, format_eta, progress_bar
from tests.conftest import ROOT
from trainer.evaluate import evaluate

DIST_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", NO_PROGRESS_ENV)


@pytest.mark.parametrize(("seconds", "text"), [
    (-5, "0s"), (0, "0s"), (42, "42s"), (59.9, "59s"), (60, "1m00s"), (425, "7m05s"), (3599, "59m59s"),
    (3600, "1h00m"), (11520, "3h12m"), (86399, "23h59m"), (86400, "1d00h"), (183600, "2d03h"),
    (40 * 86400 + 7200, "40d02h"),
])
def test_format_eta_reads_in_days_hours_minutes(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


def _read_all(fd: int) -> str:
    """Everything written to a pty so far (the other end is closed or idle)."""
    chunks = []
    while select.select([fd], [], [], 0.2)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed and drained
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def _stderr_of(fn, monkeypatch: pytest.MonkeyPatch, tty: bool, **env: str) -> str:
    """What `fn()` writes to stderr when stderr is a terminal (`tty`) or a pipe, under `env` (rank 0 unless set)."""
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    master, slave = pty.openpty() if tty else os.pipe()  # (read end, write end) both
    with open(slave, "w", closefd=True) as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        fn()
        stream.flush()
        monkeypatch.undo()
        out = _read_all(master)
    os.close(master)
    return out


def _ten_steps() -> None:
    with progress_bar(total=10, desc="work", unit="batch") as bar:
        for _ in range(10):
            bar.update(1, items=32)


def _draw(monkeypatch: pytest.MonkeyPatch, tty: bool, **env: str) -> str:
    """What a 10-step bar writes to stderr."""
    return _stderr_of(_ten_steps, monkeypatch, tty, **env)


def test_bar_is_drawn_on_rank_0_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _draw(monkeypatch, tty=True)
    assert "work: 100%" in out and "10/10" in out and "batch/s" in out and "img/s" in out, out
    assert "<0s," in out  # the ETA in format_eta's style, not tqdm's 00:00
    assert _draw(monkeypatch, tty=False) == ""  # a pipe or a log file: no bar
    assert _draw(monkeypatch, tty=True, **{NO_PROGRESS_ENV: "1"}) == ""
    assert _draw(monkeypatch, tty=True, RANK="1", WORLD_SIZE="2") == ""
    assert "work: 100%" in _draw(monkeypatch, tty=True, **{NO_PROGRESS_ENV: "0"})


def test_verify_draws_a_bar_on_a_terminal_only(digits_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m data_prep verify` with stderr on a terminal draws its bar (images, img/s, ETA); the same verb
    with `--no-progress` on a terminal, or with stderr a pipe, draws none."""
    from data_prep.__main__ import main

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    proc = subprocess.run([sys.executable, "-m", "data_prep", "verify", str(digits_shards.parent)], cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=slave, text=True, timeout=120)
    os.close(slave)
    bar = _read_all(master)
    os.close(master)
    assert proc.returncode == 0 and "all shards verified" in proc.stdout, proc.stdout + bar
    assert "verify: 100%" in bar and "1797/1797" in bar and "img/s" in bar, bar
    for tty, flags in ((True, ["--no-progress"]), (False, [])):  # in-process: the same verb, cheaper
        verb = lambda: main(["verify", str(digits_shards.parent), *flags])  # noqa: B023, E731
        assert _stderr_of(verb, monkeypatch, tty) == ""


def test_log_progress_every_tenth() -> None:
    progress = LogProgress(95, "eval", ranks=4)
    progress._t0 -= 100.0  # as if started 100 s ago: the rates and ETAs below are exact
    lines = _logged(lambda: [progress.update(1, items=8) for _ in range(95)])
    assert len(lines) == 10 and lines[-1].startswith("eval: 95/95 batches (100%) | ") and "eta 0s" in lines[-1]
    assert lines[0] == "eval: 10/95 batches (11%) | 3 img/s | eta 14m10s", lines  # 4 ranks x 10 x 8 in 100 s; 85 x 10 s
    assert lines[-1] == "eval: 95/95 batches (100%) | 30 img/s | eta 0s", lines


def test_log_progress_waits_min_interval_between_lines() -> None:
    """A loop of a few seconds logs nothing but its result; a long one keeps its marks, at most one per interval."""
    quick = LogProgress(95, "eval", min_interval=10.0)
    assert _logged(lambda: [quick.update(1, items=8) for _ in range(95)]) == []
    slow = LogProgress(95, "eval", min_interval=10.0)
    slow._t0 = slow._last = slow._t0 - 100.0  # the first mark comes 100 s after the start, the others at once
    lines = _logged(lambda: [slow.update(1, items=8) for _ in range(95)])
    assert lines == ["eval: 10/95 batches (11%) | 1 img/s | eta 14m10s"], lines


def _logged(fn) -> list[str]:
    """The INFO lines the project logger emits while `fn` runs."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    log = get_logger()
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        fn()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return records


def test_evaluate_logs_its_progress() -> None:
    """The trainers' eval reports batches done/total, img/s and the ETA in the log; the metrics do not change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    loader = [(torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8), torch.randint(-1, 3, (6,)))
              for _ in range(4)]
    plain = evaluate(model, loader, torch.device("cpu"))
    with_progress = []
    lines = _logged(lambda: with_progress.append(evaluate(model, loader, torch.device("cpu"),
                                                          progress=LogProgress(len(loader), "eval"))))
    assert with_progress[0] == plain
    assert [line.split(" | ")[0] for line in lines] == [f"eval: {i}/4 batches ({i / 4:.0%})" for i in range(1, 5)]
    assert all(" img/s | eta " in line for line in lines), lines


@pytest.mark.parametrize("verb", ["eval", "export", "fewshot", "linear-probe"])
def test_stage_verbs_take_no_progress(verb: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """`--no-progress` is a flag of every long stage verb (not an override), and it switches bars off."""
    from finetune.__main__ import main

    monkeypatch.setenv(NO_PROGRESS_ENV, "0")  # restored after the test: the flag sets it for the process
    args = [str(tmp_path / "missing")] + ([] if verb == "export" else [f"data.path={tmp_path / 'missing.json'}"])
    assert main([verb, *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unrecognized" not in err and "unknown" not in err, err
    assert os.environ[NO_PROGRESS_ENV] == "1"
