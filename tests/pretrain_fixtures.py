"""Helpers shared by the pre-training tests and the training fault scenarios: run, export and read a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import ROOT, run_torchrun
from vit.weights import load_weights

ZERO2_STEPS = 300  # the shared ZeRO-2 run's length (tests/conftest.py zero2_digits_run)


def train_args(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`python -m pretrain train debug_cpu` arguments for a run of `data` in `run_dir`."""
    return ["-m", "pretrain", "train", "debug_cpu", f"data.path={data}", f"run.dir={run_dir}", *overrides]


def _train(data: Path, run_dir: Path, *overrides: str, nproc: int = 2, timeout: float = 400, **kw) -> tuple[int, str]:
    proc = run_torchrun(train_args(data, run_dir, *overrides), nproc=nproc, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the agent; its workers notice their launcher is gone and stop
        raise
    return proc.returncode, out


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of a run: tag -> [(step, value)], plus "_images": the image tags."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]} | {
        "_images": acc.Tags()["images"]}


def _keys(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, micro-batch index) -> keys; a resumed run's rewrite of an index replaces the old line."""
    seen: dict[tuple[int, int], list[str]] = {}
    for f in sorted((run_dir / "keys").glob("rank*.txt")):
        rank, batches = int(f.stem.removeprefix("rank")), {}
        for line in f.read_text().splitlines():
            i, key = line.split("\t")
            batches.setdefault(int(i), {})[key] = None  # a rewritten index starts again below
        for i, keys in batches.items():
            seen[(rank, i)] = list(keys)
    return seen


def _export(run_dir: Path, *extra: str) -> dict[str, torch.Tensor]:
    out = run_dir / "export" / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "export", str(run_dir), "--out", str(out), *extra],
                          cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    # stdout is the result alone, for `W=$(python -m pretrain export RUN)`: DeepSpeed's lines go to stderr
    assert proc.stdout.splitlines() == [str(out)], proc.stdout[-2000:]
    return load_weights(out)[0]  # vitscale's key names (the file stores timm's)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
