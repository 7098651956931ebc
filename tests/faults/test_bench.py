"""bench/faults.py: every scenario is registered with a row text, and the report renders each row."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from tests.conftest import ROOT
from tests.faults.catalog import load_all


def _bench():
    spec = importlib.util.spec_from_file_location("faults_bench", ROOT / "bench" / "faults.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_scenario_is_listed() -> None:
    out = subprocess.run([sys.executable, "bench/faults.py", "--list"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    for name, entry in load_all().items():
        assert name in out.stdout and entry.proves and entry.trials >= 1


def test_report_rows() -> None:
    rows = {"a": {"scenario": "a", "proves": "x survives y", "trials": 3, "survived": 2, "data_lost": 0,
                  "max_exit_s": 12.34, "command": "python bench/faults.py --scenario a --trials 3 --seed 1",
                  "failures": ["trial 2: AssertionError: boom"], "example": "killed at step 3",
                  "date": "2026-11-27", "machine": "2-core x86_64 machine"}}
    doc = _bench().render(rows)
    row = "| `a` | x survives y | 3 | 2 | 0 | 12.3 | `python bench/faults.py --scenario a --trials 3 --seed 1` |"
    assert row in doc
    assert "FAILED trial 2: AssertionError: boom" in doc


def test_unknown_scenario_is_refused() -> None:
    out = subprocess.run([sys.executable, "bench/faults.py", "--scenario", "nope"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "unknown scenario" in out.stderr
