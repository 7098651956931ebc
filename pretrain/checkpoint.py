"""Checkpoints: DeepSpeed's layout plus our trainer state, one tag directory per save.

run.dir/checkpoints/
  global_step{N}/            DeepSpeed model + optimizer shards (every rank writes its own)
    trainer_state.json       step, epoch, stream position, world size, config hash, class names
    rng_rank{r}.safetensors  each rank's RNG states (dropout, drop-path, mixup draws)
    ema.safetensors          EMA weights, when enabled
  latest                     tag of the newest COMPLETE checkpoint: written by rank 0 only after
                             every rank reported a successful write (an all-gather), atomically

DeepSpeed reads its own files with a full unpickler (torch.load(weights_only=False)), which runs whatever
code a crafted pickle names. So before a checkpoint folder is handed to DeepSpeed (resume, export,
universal conversion), `check_pickles` reads the pickle of every *.pt in it WITHOUT running it and refuses
any class or function outside torch's weights-only set and the few DeepSpeed classes its checkpoints hold.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as torch_dist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.serialization import get_unsafe_globals_in_checkpoint

from runtime.config import ConfigError
from runtime.dist import DistEnv, barrier
from runtime.io import atomic_path, atomic_write, atomic_write_json

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
# The pickle globals outside torch's weights-only set that DeepSpeed's own checkpoints contain (seen in real
# ZeRO 0-3 checkpoints in bf16 and fp32; DynamicLossScaler is what fp16 adds, which DeepSpeed refuses on CPU,
# taken from its source): plain data classes whose construction runs no user code.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file that could run code when unpickled, or that is not a torch checkpoint at all.
    (A bad input like a bad config: the CLIs report it on one line with exit code 2.)"""


def check_pickles(folder: str | Path) -> int:
    """Refuse `folder` unless every *.pt under it is a torch zip checkpoint whose pickle names only safe
    globals; returns the number of files checked. Nothing is unpickled: the pickle opcodes are only read
    (an opcode the reader does not know, e.g. one that builds a global from the stack, is refused too)."""
    files = sorted(Path(folder).rglob("*.pt"))
    for f in files:
        if not zipfile.is_zipfile(f):
            raise UnsafeCheckpointError(f"{f} is not a torch zip checkpoint (a legacy or foreign pickle); refusing "
                                        "to load it: restore this checkpoint from a trusted copy or delete it")
        try:
            bad = sorted(set(get_unsafe_globals_in_checkpoint(f)) - DEEPSPEED_GLOBALS)
        except Exception as e:  # unknown opcode, no data.pkl, torchscript archive, truncated zip...
            raise UnsafeCheckpointError(f"{f} cannot be checked as a safe checkpoint ({type(e).__name__}: {e}); "
                                        "refusing to load it: restore it from a trusted copy or delete it") from None
        if bad:
            raise UnsafeCheckpointError(f"{f} names {', '.join(bad)} in its pickle, which could run code when "
                                        "loaded; refusing it: only resume/export checkpoints from a trusted source")
    return len(files)


def tag_for(step: int) -> str:
    return f"global_step{step}"


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none."""
    f = Path(ckpt_dir) / "latest"
    if not f.exists():
        return None
    tag = f.read_text().strip()
    if not (Path(ckpt_dir) / tag / STATE_FILE).exists():
        raise ConfigError(f"{f} names {tag!r} but {Path(ckpt_dir) / tag / STATE_FILE} is missing; "
                           "delete `latest` or point it at a complete checkpoint directory")
    return tag


def read_state(ckpt_dir: str | Path, tag: str) -> dict:
    """The trainer state saved with checkpoint `tag`."""
    return json.loads((Path(ckpt_dir) / tag / STATE_FILE).read_text())


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


class CheckpointError(RuntimeError):
    """A checkpoint could not be written on some rank; the previous one is intact and still `latest`."""


def save(engine, ckpt_dir: str | Path, step: int, state: dict, env: DistEnv, keep: int,
         ema: dict[str, torch.Tensor] | None = None, fault: Callable[[], None] | None = None) -> str:
    """Save a checkpoint on every rank; `latest` moves only after all ranks wrote theirs. Returns the tag.

    A write error on any rank (a full disk) fails the save on EVERY rank alike, with CheckpointError: the
    ranks agree on success before `latest` moves, so none waits in a barrier for a rank that gave up, and the
    partial tag directory is removed. `fault` (tests only) runs after this rank's writes, before the agreement.
    """
    ckpt_dir, tag = Path(ckpt_dir), tag_for(step)
    error = _write(engine, ckpt_dir, tag, step, state, env, ema)
    if error is None and fault is not None:
        fault()
    errors = _gather(error)
    if any(errors):
        if env.is_main:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        barrier()
        failed = "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors) if e)
        hint = "free space there (or lower checkpoint.keep)" if any("ENOSPC" in e for e in errors if e) \
            else "check that run.dir is writable"
        raise CheckpointError(f"checkpoint {tag} could not be written ({failed}); its partial directory was removed "
                              f"and `latest` still names {latest_tag(ckpt_dir)}; {hint} and rerun the same command "
                              "to resume")
    if env.is_main:
        atomic_write(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep, tag)
    barrier()
    return tag


def _write(engine, ckpt_dir: Path, tag: str, step: int, state: dict, env: DistEnv,
           ema: dict[str, torch.Tensor] | None) -> str | None:
    """Write this rank's part of checkpoint `tag`; a one-line description if a write failed, else None."""
    client = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError without errno
        # DeepSpeed's save ends in a barrier that this rank skipped by raising (ZeRO <= 2 has no other collective
        # after its writes begin): stand in for it, so that peers that wrote fine are not left waiting there.
        barrier()
        return _describe(err, ckpt_dir)
    tag_dir = ckpt_dir / tag
    try:
        with atomic_path(tag_dir / f"rng_rank{env.rank}.safetensors") as tmp:
            save_file(_rng_state(), str(tmp))
        if env.is_main:
            if ema is not None:
                with atomic_path(tag_dir / EMA_FILE) as tmp:
                    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp))
            atomic_write_json(tag_dir / STATE_FILE, {**state, "step": step, "world_size": env.world_size})
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        return _describe(err, ckpt_dir)
    return None


def _describe(err: Exception, ckpt_dir: Path) -> str:
    """The write error in one line, naming a full disk (ENOSPC) even where torch.save hides the errno."""
    free = shutil.disk_usage(ckpt_dir).free
    # A write that filled the disk leaves it (nearly) full until the partial files are removed.
    full = getattr(err, "errno", None) == errno.ENOSPC or free < 1 << 20
    text = " ".join(str(err).split())[:300]
    return f"ENOSPC, no space left on device ({free >> 10} KiB free): {text}" if full else text


def _gather(error: str | None) -> list[str | None]:
    """Every rank's write error (None = wrote fine), on every rank."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [error]
    errors: list[str | None] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(errors, error)
    return errors


def _prune(ckpt_dir: Path, keep: int, newest: str) -> None:
    tags = sorted((p for p in ckpt_dir.glob("global_step*") if p.is_dir() and not p.name.endswith("_universal")),
                  key=lambda p: int(p.name.removeprefix("global_step")))
    for old in tags[: max(0, len(tags) - keep)]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)


def load(engine, ckpt_dir: str | Path, tag: str, env: DistEnv, universal: bool) -> None:
    """Restore model, optimizer, schedule and (same world size) this rank's RNG from checkpoint `tag`."""
    check_pickles(Path(ckpt_dir) / tag)  # DeepSpeed unpickles without restriction: check first
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {ckpt_dir}")
    rng_file = Path(ckpt_dir) / tag.removesuffix("_universal") / f"rng_rank{env.rank}.safetensors"
    if not universal and rng_file.exists():
        rng = load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


def load_ema(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor] | None:
    f = Path(ckpt_dir) / tag.removesuffix("_universal") / EMA_FILE
    return load_file(str(f)) if f.exists() else None


def convert_universal(ckpt_dir: str | Path, tag: str) -> Path:
    """Convert checkpoint `tag` to DeepSpeed's universal format (one folder per parameter), once."""
    src = Path(ckpt_dir) / tag
    dst = Path(ckpt_dir) / f"{tag}_universal"
    check_pickles(src)  # ds_to_universal unpickles without restriction
    if not (dst / "zero").exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
               "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"universal checkpoint conversion failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        shutil.rmtree(dst, ignore_errors=True)
        tmp.rename(dst)
    return dst


def to_universal(ckpt_dir: str | Path, tag: str, env: DistEnv) -> str:
    """Rank 0 converts checkpoint `tag` to the universal format while the others wait; returns its tag."""
    if env.is_main:
        convert_universal(ckpt_dir, tag)
    barrier()
    return f"{tag}_universal"


def universal_state_dict(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint `tag` through its universal form (works for every ZeRO stage and precision)."""
    zero = convert_universal(ckpt_dir, tag) / "zero"
    return {p.name: torch.load(p / "fp32.pt", map_location="cpu", weights_only=True)["param"]
            for p in sorted(zero.iterdir()) if (p / "fp32.pt").exists()}
