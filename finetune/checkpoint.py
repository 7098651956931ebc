"""Fine-tuning checkpoints: resumable training state, the kept weight files and the JSON report.

    RUN/checkpoints/step{N}/     Accelerate's `save_state` (model, optimizer, RNG; DeepSpeed files under ZeRO)
                                 + ema.safetensors + trainer_state.json (step, epoch, stream position, evals)
    RUN/checkpoints/latest       the newest complete tag, written by rank 0 after every rank finished
    RUN/best.safetensors, RUN/last.safetensors, RUN/report.json

Weight files are vitscale weight files (safetensors + config); nothing here is unpickled beyond what
Accelerate's `load_state` reads with `weights_only=True`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from runtime.dist import barrier
from runtime.io import atomic_path, atomic_write, atomic_write_json


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none."""
    f = checkpoints_dir(run_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not (checkpoints_dir(run_dir) / tag / "trainer_state.json").is_file():
        raise RuntimeError(f"{f} names {tag!r}, which is incomplete; delete {f} to resume from an earlier tag")
    return tag


def save_checkpoint(accelerator, run_dir: str | Path, state: dict, ema: dict | None, keep: int,
                    is_main: bool) -> Path:
    """Save the full training state as checkpoints/step{N}; every rank must call this."""
    tag = f"step{state['step']}"
    out = checkpoints_dir(run_dir) / tag
    out.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(out))  # collective under DeepSpeed; per-rank RNG files otherwise
    if is_main:
        if ema is not None:
            with atomic_path(out / "ema.safetensors") as tmp:
                save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp))
        atomic_write_json(out / "trainer_state.json", state)
    barrier()  # `latest` moves only once every rank wrote its part
    if is_main:
        atomic_write(checkpoints_dir(run_dir) / "latest", tag)
        _prune(checkpoints_dir(run_dir), keep, current=tag)
    barrier()
    return out


def _prune(ckpt_dir: Path, keep: int, current: str) -> None:
    tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
    for old in tags[:-keep] if keep > 0 else []:
        if old.name != current:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(accelerator, run_dir: str | Path, tag: str) -> tuple[dict, dict | None]:
    """Restore model/optimizer/RNG from checkpoints/TAG; return (trainer state, EMA tensors or None)."""
    src = checkpoints_dir(run_dir) / tag
    accelerator.load_state(str(src))
    state = json.loads((src / "trainer_state.json").read_text())
    ema_file = src / "ema.safetensors"
    ema = load_file(str(ema_file), device=str(accelerator.device)) if ema_file.is_file() else None
    return state, ema


def float_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict on the CPU in fp32 (ZeRO/bf16 parameters included), ready for a weight file."""
    return {k: v.detach().float().cpu() for k, v in sd.items()}
