"""The one checkpoint protocol: everything a resumed run needs, one tag directory per save.

run.dir/checkpoints/
  global_step{N}/            the backend's own files (DeepSpeed's model + optimizer shards, or the
                             Accelerate backend's model.safetensors + optimizer.pt)
    trainer_state.json       step, applied steps, epoch, stream position, evals, world size, backend,
                             the resolved config (and its hash), class names, the model's ViTConfig
    rng_rank{r}.safetensors  each rank's torch RNG states (dropout, drop-path; mixup is seeded per micro-batch)
    ema.safetensors          EMA weights, when enabled
  latest                     tag of the newest COMPLETE checkpoint: written by rank 0 only after every rank
                             reported a successful write (an all-gather), atomically

Backends read their own files with a full unpickler (DeepSpeed: torch.load(weights_only=False)), which runs
whatever code a crafted pickle names. So before a checkpoint folder is handed to one, `check_pickles` reads
the pickle of every *.pt in it WITHOUT running it and refuses any class or function outside torch's
weights-only set and the few the backend declares. See docs/architecture.md.
"""

from __future__ import annotations

import errno
import json
import shutil
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.serialization import get_unsafe_globals_in_checkpoint

from runtime.config import ConfigError, config_changes, config_hash, flatten, to_dict, yaml_text
from runtime.dist import DistEnv, all_gather_objects, barrier
from runtime.io import atomic_path, atomic_write, atomic_write_json
from trainer.errors import CheckpointError

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
# The pickle globals outside torch's weights-only set that DeepSpeed's own checkpoints contain (seen in real
# ZeRO 0-3 checkpoints in bf16 and fp32; DynamicLossScaler is what fp16 adds, which DeepSpeed refuses on CPU,
# taken from its source): plain data classes whose construction runs no user code. Strings, so that checking
# needs no deepspeed import.
DEEPSPEED_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class UnsafeCheckpointError(ConfigError):
    """A checkpoint file that could run code when unpickled, or that is not a torch checkpoint at all.
    (A bad input like a bad config: the CLIs report it on one line with exit code 2.)"""


def check_pickles(folder: str | Path, allowed: Iterable[str] = ()) -> int:
    """Refuse `folder` unless every *.pt under it is a torch zip checkpoint whose pickle names only safe
    globals (torch's weights-only set plus `allowed`); returns the number of files checked. Nothing is
    unpickled: the opcodes are only read (an opcode the reader does not know is refused too)."""
    files = sorted(Path(folder).rglob("*.pt"))
    for f in files:
        if not zipfile.is_zipfile(f):
            raise UnsafeCheckpointError(f"{f} is not a torch zip checkpoint (a legacy or foreign pickle); refusing "
                                        "to load it: restore this checkpoint from a trusted copy or delete it")
        try:
            bad = sorted(set(get_unsafe_globals_in_checkpoint(f)) - set(allowed))
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


# what a resumable checkpoint's trainer_state.json holds (older vitscale versions wrote less)
STATE_KEYS = ("step", "applied", "skipped", "evals", "best_top1", "stream", "ema_updates", "world_size", "backend",
              "class_names", "vit_config", "eval_settings")


def check_resumable(ckpt_dir: str | Path, tag: str, backend: str) -> dict:
    """The state of checkpoint `tag`, or a ConfigError when this stage's backend cannot resume it."""
    state = read_state(ckpt_dir, tag)
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ConfigError(f"{Path(ckpt_dir) / tag} was written by an older vitscale (its {STATE_FILE} has no "
                          f"{', '.join(missing[:3])}); resume it with that version, or start a new run.dir")
    if state["backend"] != backend:
        raise ConfigError(f"{Path(ckpt_dir) / tag} is a {state['backend']} checkpoint, not {backend}'s: run.dir "
                          "belongs to the other stage; pass a new run.dir (or init=that run dir to start from it)")
    return state


# The config keys a resume cannot change and still be the continuation of the saved run; the one list, read by
# preflight (refused, exit 2, unless `train --allow-changed`) and by the loop (logged). Every other key is a
# setting the user may change between starts (eval/log/checkpoint cadence, run length, LR, augmentation, debug,
# run.dir when the run was moved...): logged and allowed. A section name covers all its keys.
EXACT_RESUME_KEYS = (
    # the sample order: the saved stream position (data_prep/stream.py's LAYOUT_KEYS) and the RNG states count
    # samples of this seed, dataset, split, batch layout and worker split
    "run.seed", "data.path", "data.train_split", "data.workers", "data.resampled", "data.samples_per_epoch",
    "data.shuffle_buffer", "data.min_size", "train.global_batch", "train.micro_batch",
    # the checkpoint's tensors: the model's shapes, the optimizer's state and parameter groups (layer decay 1
    # makes two groups, any other value one per layer), and the backend's layout of both (ZeRO stage, precision's
    # master weights). The world size is not a key: both backends reshard (DeepSpeed's universal checkpoint,
    # Accelerate's full state), and the stream continues at the nearest position.
    "model.variant", "model.image_size", "model.representation_size", "data.num_classes", "optim.name",
    "optim.layer_decay", "precision", "zero.stage", "deepspeed.zero_stage",
)


def breaks_exact_resume(key: str) -> bool:
    """Whether changing config `key` (a.b) between two starts of a run breaks its exact resume."""
    return any(key == k or key.startswith(k + ".") for k in EXACT_RESUME_KEYS)


def saved_config(ckpt_dir: str | Path, saved: dict) -> dict | None:
    """The resolved config checkpoint state `saved` was written with; None when it cannot be told. Older
    checkpoints hold only its hash: the run dir's config.yaml is used when it hashes the same."""
    if isinstance(saved.get("config"), dict):
        return saved["config"]
    f = Path(ckpt_dir).parent / "config.yaml"
    try:
        data = yaml.safe_load(f.read_text()) if f.is_file() else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) and config_hash(data) == saved.get("config_hash") else None


def resume_changes(ckpt_dir: str | Path, saved: dict, cfg) -> tuple[list[str], list[str]] | None:
    """The keys `cfg` changed since checkpoint state `saved`, as ("key old -> new" lines that break exact resume,
    those that do not); None when the saved config is unknown."""
    old = saved_config(ckpt_dir, saved)
    if old is None:
        return None
    breaking, harmless, known = [], [], flatten(old)
    for key, before, after in config_changes(old, to_dict(cfg)):
        # a key the saved config lacks is one a newer vitscale added (or a removed one): not a change of the user's
        line = f"{key} {yaml_text(before)} -> {yaml_text(after)}" + ("" if key in known else " (a new key)")
        (breaking if breaks_exact_resume(key) and key in known else harmless).append(line)
    return breaking, harmless


def check_changes(ckpt_dir: str | Path, tag: str, saved: dict, cfg, allow_changed: bool) -> None:
    """Refuse (ConfigError) to resume checkpoint `tag` with a config that breaks its exact resume, unless allowed."""
    changes = resume_changes(ckpt_dir, saved, cfg)
    if changes and changes[0] and not allow_changed:
        raise ConfigError(f"resuming {Path(ckpt_dir) / tag} with changes that break exact resume: "
                          f"{'; '.join(changes[0])}; restore them, start a new run.dir, or pass --allow-changed to "
                          "`train` to resume anyway (not sample-exact)")


def save(backend, ckpt_dir: str | Path, step: int, state: dict, env: DistEnv, keep: int,
         ema: dict[str, torch.Tensor] | None = None, fault: Callable[[], None] | None = None) -> str:
    """Save a checkpoint on every rank; `latest` moves only after all ranks wrote theirs. Returns the tag.

    A write error on any rank (a full disk) fails the save on EVERY rank alike, with CheckpointError: the
    ranks agree on success before `latest` moves, so none waits in a barrier for a rank that gave up, and the
    partial tag directory is removed. `fault` (tests only) runs after this rank's writes, before the agreement.
    """
    ckpt_dir, tag = Path(ckpt_dir), tag_for(step)
    error = _write(backend, ckpt_dir, tag, state, env, ema)
    if error is None and fault is not None:
        fault()
    errors = all_gather_objects(error)  # every rank's write error (None = wrote fine)
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


def _write(backend, ckpt_dir: Path, tag: str, state: dict, env: DistEnv,
           ema: dict[str, torch.Tensor] | None) -> str | None:
    """Write this rank's part of checkpoint `tag`; a one-line description if a write failed, else None."""
    tag_dir = ckpt_dir / tag
    try:
        tag_dir.mkdir(parents=True, exist_ok=True)
        backend.save(ckpt_dir, tag)
        with atomic_path(tag_dir / f"rng_rank{env.rank}.safetensors") as tmp:
            save_file(_rng_state(), str(tmp))
        if env.is_main:
            if ema is not None:
                with atomic_path(tag_dir / EMA_FILE) as tmp:
                    save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, str(tmp))
            atomic_write_json(tag_dir / STATE_FILE, {**state, "world_size": env.world_size, "backend": backend.name})
    # torch.save reports a full disk as a RuntimeError without errno; safetensors as its own error type
    except (OSError, RuntimeError, SafetensorError) as err:
        return _describe(err, ckpt_dir)
    return None


def _describe(err: Exception, ckpt_dir: Path) -> str:
    """The write error in one line, naming a full disk (ENOSPC) even where torch.save hides the errno."""
    free = shutil.disk_usage(ckpt_dir).free
    # A write that filled the disk leaves it (nearly) full until the partial files are removed.
    full = getattr(err, "errno", None) == errno.ENOSPC or free < 1 << 20
    text = " ".join(str(err).split())[:300]
    return f"ENOSPC, no space left on device ({free >> 10} KiB free): {text}" if full else text


def _prune(ckpt_dir: Path, keep: int, newest: str) -> None:
    tags = sorted((p for p in ckpt_dir.glob("global_step*") if p.is_dir() and p.name[11:].isdigit()),
                  key=lambda p: int(p.name.removeprefix("global_step")))
    for old in tags[: max(0, len(tags) - keep)]:
        if old.name != newest:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def load_rng(ckpt_dir: str | Path, tag: str, rank: int) -> bool:
    """Restore this rank's RNG states from checkpoint `tag`; False when the checkpoint has none for it."""
    f = Path(ckpt_dir) / tag / f"rng_rank{rank}.safetensors"
    if not f.exists():
        return False
    rng = load_file(str(f))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return True


def load_ema(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor] | None:
    f = Path(ckpt_dir) / tag / EMA_FILE
    return load_file(str(f)) if f.exists() else None
