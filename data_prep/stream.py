"""The streaming loader that feeds training and evaluation from WebDataset shards (see docs/architecture.md).

    data = DataCfg(path="data/dataset.json", workers=8)   # a recipe's `data:` section
    loader = build_loader(data, "train", train=True, dist_env=env, image_size=224, micro_batch=128, seed=0,
                          global_batch=4096)
    for images, labels in loader:        # one epoch from the current position; uint8 (B, 3, H, W), int64 (B,)
        x = normalize(images, device="cuda")
        ...
    ckpt["stream"] = loader.state_dict()  # any rank's copy serves every rank

Guarantees:
- Training: every rank yields exactly `len(loader) = steps_per_epoch * accumulation` micro-batches per
  epoch, `steps_per_epoch = samples_per_epoch // global_batch`, whatever the shard sizes and faults.
  With a dataset.json and `resampled=False`, no sample appears twice in an epoch and at most the remainder
  `samples_per_epoch - steps_per_epoch * global_batch` is left out.
- Order: a pure function of (seed, epoch, world size, workers, micro-batch). `loader.epoch` and
  `loader.position` name the next micro-batch to yield (after the last batch of an epoch: epoch + 1, 0).
  `state_dict()` between any two batches holds them; after `load_state_dict()` the loader yields exactly
  the batches (keys, crops, flips) an uninterrupted run would have yielded next. The state is the same on
  every rank, so rank 0's copy in a checkpoint serves all ranks.
- Eval (`train=False`): the split in written order, each sample exactly once across ranks, the last partial
  batch included. Every rank yields the same number of micro-batches (ZeRO-3 forwards are collectives),
  so the short ranks are padded with filler samples: zero images with label -1, to be ignored when
  counting top-1/top-5 (`labels >= 0`).
- Faults: a corrupt, missing or too small (`min_size`) image or a bad label is counted in `loader.stats` and
  replaced by a good neighbour of its micro-batch (train) or a label -1 filler (eval); a truncated or
  unreadable shard is counted and the reader moves on; a tar member with an unsafe name (absolute, `..`) is
  dropped and counted. Each fault of an epoch is counted once, by the reader whose share holds it. Nothing is
  fatal except a source with no readable sample at all.
- Epochs: in training the workers run on into the next epoch (a pass takes its `len(loader)` batches), so its
  first batches are ready when it starts; a pass left early, `load_state_dict` or `close()` restarts them.
- Lifetime: the DataLoader workers end when the loader is closed, garbage-collected or the interpreter exits
  (a script need not call `close()`), but they ignore SIGTERM/SIGUSR1/SIGINT: a preemption signal sent to the
  whole process group is the training process's to handle, and cannot kill them mid-checkpoint. With
  decode="gpu", the thread that decodes ahead (data_prep/gpu_decode.py) ends with its pass, and so with the loader.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import dataclasses
import itertools
import math
import multiprocessing.util  # noqa: F401 (imported before the exit hook below is registered: see _LIVE)
import os
import weakref
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from data_prep import gpu_decode
from data_prep.augment import mixup_cutmix, smooth_one_hot, soft_target_cross_entropy
from data_prep.stream_config import DEFAULT_INTERPOLATION, DataCfg
from data_prep.stream_source import MAX_SHARD_NAMES, Source, derive_seed, resolve_source
from data_prep.stream_worker import (
    FILLER_LABEL,
    ShardStream,
    StreamConfig,
    forking_workers,
    init_worker,
)
from data_prep.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, seeded_torch_rng, to_hw
from runtime.dist import DistEnv, accumulation_steps

__all__ = ["build_loader", "DataCfg", "StreamLoader", "normalize", "mixup_cutmix", "smooth_one_hot",
           "soft_target_cross_entropy", "IMAGENET_MEAN", "IMAGENET_STD", "FILLER_LABEL"]

STATE_FORMAT = "vitscale-stream/1"
# what the sample order depends on: a saved position means nothing if one of these changed
LAYOUT_KEYS = ("seed", "world_size", "workers", "micro_batch", "samples_per_epoch", "batches", "split", "train",
               "resampled")
SAMPLE_FAULTS = ("corrupt_image", "missing_image", "bad_label", "too_small")
SHARD_FAULTS = ("truncated_shard", "unreadable_shard", "unsafe_member")

# The DataLoaders of live StreamLoaders, by key: their workers are stopped when the StreamLoader is collected (a
# weakref.finalize holding only the key) or at interpreter exit (_stop_all_at_exit). The workers ignore SIGTERM, so
# multiprocessing's own exit hook, which terminates daemonic children with SIGTERM and then joins them, would wait
# forever: ours must run first. atexit runs hooks last-registered-first, and this module imports
# multiprocessing.util and torch.utils.data (whose hook marks the interpreter as exiting, after which DataLoader
# shutdown is a no-op) before registering, so ours runs before both. weakref.finalize's own exit pass is not used:
# it may run after ours or before, and after it has run no finalizer can be called. Each entry names the process
# that owns the workers: a forked child's copy of the table (or of a loader) must not stop its parent's workers.
_LIVE: dict[int, tuple[int, DataLoader]] = {}
_KEYS = itertools.count()
KILL_AFTER_S = 5.0  # how long a worker that ignored the shutdown may take before it is killed


def _stop_workers(dataloader: DataLoader) -> None:
    """End a DataLoader's worker processes now and wait for them (nothing to do without workers).

    torch's shutdown asks each worker to stop after its current micro-batch, then falls back to SIGTERM, which
    our workers ignore; a worker still alive after that only reads data, so it is killed.
    """
    it, dataloader._iterator = dataloader._iterator, None
    if it is None or not hasattr(it, "_shutdown_workers"):
        return
    it._shutdown_workers()
    for w in getattr(it, "_workers", ()):
        if w.is_alive():
            w.kill()
            w.join(timeout=KILL_AFTER_S)


def _release(key: int) -> None:
    owner, dataloader = _LIVE.pop(key, (None, None))
    if owner == os.getpid():
        _stop_workers(dataloader)


@atexit.register
def _stop_all_at_exit() -> None:
    gpu_decode.stop_all()  # the decode threads first: they may be decoding a batch the workers delivered
    for key in list(_LIVE):
        _release(key)


class StreamLoader:
    """One rank's view of the stream: iterate for one epoch, `state_dict()` to save the position."""

    def __init__(self, dataset: ShardStream, *, workers: int, steps_per_epoch: int, global_batch: int | None,
                 device: torch.device, pin_memory: bool, prefetch: int, timeout_s: float, with_keys: bool):
        self.dataset = dataset
        self.cfg: StreamConfig = dataset.cfg
        self.steps_per_epoch = steps_per_epoch
        self.global_batch = global_batch
        self.device = device
        self.with_keys = with_keys
        self.epoch = 0
        self.position = 0  # micro-batches of this epoch already yielded
        self._counts: collections.Counter[str] = collections.Counter()
        self._bad_shards: set[str] = set()
        self._active: weakref.ref | None = None
        # ((epoch, position), the workers' batches) after a training pass ran to its end: read on by the next pass
        self._next: tuple[tuple[int, int], Iterator[dict]] | None = None
        self._decoder = gpu_decode.DeviceDecoder(self.cfg, device) if self.cfg.decode == "gpu" else None
        # the private generator keeps the DataLoader from drawing its worker seeds from the trainer's RNG
        # (the stream seeds itself from `seed`)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                  persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None,
                                  timeout=timeout_s if workers else 0, generator=torch.Generator(),
                                  worker_init_fn=init_worker if workers else None)
        if workers:
            # the finaliser holds a key, not the loader, which it would otherwise keep alive forever
            key = next(_KEYS)
            _LIVE[key] = (os.getpid(), self._loader)
            weakref.finalize(self, _release, key).atexit = False  # _stop_all_at_exit covers the exit

    def __len__(self) -> int:
        """Micro-batches per rank per epoch."""
        return self.cfg.batches

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names by label (from dataset.json; None for a URL list)."""
        return self.cfg.source.classes

    @property
    def num_classes(self) -> int | None:
        """DataCfg.num_classes if set, else the size of dataset.json's class list (None for a URL list)."""
        if self.cfg.num_classes is not None:
            return self.cfg.num_classes
        return len(self.cfg.source.classes) if self.cfg.source.classes else None

    def __iter__(self) -> Iterator[tuple]:
        # one pass at a time: an abandoned pass, resumed later, would read the new pass's batches and move
        # (epoch, position) under it; closed, it just ends
        self._close_active()
        gen = self._epoch()
        self._active = weakref.ref(gen)
        return gen

    def _epoch(self) -> Iterator[tuple]:
        cfg = self.cfg
        if self.position >= len(self):  # a state from before positions wrapped eagerly: start the next epoch
            self.epoch, self.position = self.epoch + 1, 0
        epoch, start = self.epoch, self.position
        workers = feed = self._workers_from(epoch, start)
        if cfg.train:  # the workers' stream runs on into the next epoch: this pass takes its own batches
            workers = itertools.islice(workers, len(self) - start)
        batches = self._in_order(workers, epoch, start)
        if self._decoder is not None:  # decode="gpu": decoded on a background thread, a batch or two ahead
            batches = gpu_decode.decode_ahead(batches, self._decoder)
        i = start
        with contextlib.closing(batches):  # a closed pass stops its decode thread before the next pass starts
            for batch in batches:
                self._merge(batch["stats"])
                images, labels, keys = batch["images"], batch["labels"], batch["keys"]
                if self._decoder is not None:
                    images = self._randaugment(gpu_decode.receive(batch), epoch, batch["slot"], batch["index"])
                i += 1
                # (epoch, position) always name the next batch to yield, so a state saved now resumes after it
                self.epoch, self.position = (epoch + 1, 0) if i == len(self) else (epoch, i)
                if i == len(self) and cfg.train:  # the workers are already on the next epoch: keep them
                    self._next = ((epoch + 1, 0), feed)
                yield (images, labels, keys) if self.with_keys else (images, labels)
        if i != len(self):
            raise RuntimeError(f"rank {cfg.rank}: the stream ended after {i} of {len(self)} micro-batches of "
                               f"epoch {epoch} (started at {start})")

    def _workers_from(self, epoch: int, start: int) -> Iterator[dict]:
        """The workers' batches from (epoch, start) on: those of the pass that just ended where it ran on into
        this one (training), else the workers restarted at that position."""
        kept, self._next = self._next, None
        if kept is not None and kept[0] == (epoch, start):
            return kept[1]
        self.dataset.set_position(epoch, start)
        with forking_workers():  # iter() forks the workers (and before any thread of ours starts)
            return iter(self._loader)

    def _in_order(self, batches: Iterator[dict], epoch: int, start: int) -> Iterator[dict]:
        """The workers' batches, checked to arrive as batch start, start + 1, ... of the rank's epoch."""
        workers = self.cfg.workers
        for i, batch in enumerate(batches, start):
            if (batch["epoch"], batch["slot"], batch["index"]) != (epoch, i % workers, i // workers):
                raise RuntimeError(f"stream out of order at micro-batch {i} of epoch {epoch}: got epoch "
                                   f"{batch['epoch']} slot {batch['slot']} batch {batch['index']}; the DataLoader "
                                   "no longer asks its workers round-robin")
            yield batch

    def _randaugment(self, images: torch.Tensor, epoch: int, slot: int, index: int) -> torch.Tensor:
        """decode="gpu": RandAugment on the device images, seeded per micro-batch. On the training thread:
        torchvision draws from torch's global generator, which a background thread would share with the
        trainer."""
        if self.dataset.randaugment is not None:
            cfg = self.cfg
            with seeded_torch_rng(derive_seed(cfg.seed, epoch, cfg.rank, slot, index, "ra")):
                for i in range(len(images)):
                    images[i] = self.dataset.randaugment(images[i])
        return images

    def _merge(self, delta: dict) -> None:
        self._counts.update(delta["counts"])
        for name in delta["shards"]:
            if len(self._bad_shards) < MAX_SHARD_NAMES:
                self._bad_shards.add(name)

    @property
    def stats(self) -> dict:
        """This rank's counters since the start (restored by `load_state_dict`)."""
        c = self._counts
        return {
            "samples": c["samples"],  # good samples delivered
            "skipped": sum(c[r] for r in SAMPLE_FAULTS),
            "by_reason": {r: c[r] for r in SAMPLE_FAULTS + SHARD_FAULTS},
            "substituted": c["substituted"],  # faulty samples replaced by a neighbour (train)
            "filler": c["filler"],  # faulty samples replaced by a label -1 filler
            "padding": c["padding"],  # eval padding so that every rank has the same batch count
            "shards_with_errors": sorted(self._bad_shards),
        }

    def state_dict(self) -> dict:
        """The stream position and the layout it depends on; valid between any two batches, on any rank."""
        cfg = self.cfg
        layout = {k: getattr(cfg, k) for k in LAYOUT_KEYS}
        return {"format": STATE_FORMAT, "epoch": self.epoch, "position": self.position, **layout,
                "global_batch": self.global_batch, "stats": {"counts": dict(self._counts),
                                                             "shards": sorted(self._bad_shards)}}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from a saved position. With `strict=False` a changed layout (world size, workers,
        micro-batch...) restarts the saved epoch at the same share of its samples, which is not exact."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a stream state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        changed = [f"{k}={state.get(k)!r} (now {getattr(self.cfg, k)!r})" for k in LAYOUT_KEYS
                   if state.get(k) != getattr(self.cfg, k)]
        position = int(state["position"])
        if changed:
            if strict:
                raise ValueError(f"stream state was saved with {', '.join(changed)}; the sample order depends on "
                                 "these: rebuild the loader with the saved values, or load with strict=False to "
                                 "restart the saved epoch at the nearest position (not exact)")
            done = position * state["micro_batch"] * state["world_size"]  # samples the job had consumed
            position = min(len(self), done // (self.cfg.micro_batch * self.cfg.world_size))
        self._close_active()
        self._next = None
        self.epoch, self.position = int(state["epoch"]), position
        self._counts = collections.Counter(state["stats"]["counts"])
        self._bad_shards = set(state["stats"]["shards"])

    def _close_active(self) -> None:
        gen = self._active() if self._active else None
        self._active = None
        if gen is not None:
            gen.close()  # GeneratorExit at its yield: the pass ends without touching (epoch, position)

    def close(self) -> None:
        """End the current pass and stop the workers now; iterating again starts new workers from the saved
        position. (Without a call, the workers stop when the loader is garbage-collected or at exit.)"""
        self._close_active()
        self._next = None
        _stop_workers(self._loader)


def _plan(src: Source, *, train: bool, global_batch: int | None, micro_batch: int, world: int, readers: int,
          samples_per_epoch: int | None, resampled: bool) -> tuple[int, int, int]:
    """(samples_per_epoch, steps_per_epoch, micro-batches per rank per epoch), or a clear error."""
    if not train:
        if not src.counted:
            raise ValueError("an exact eval pass needs per-shard sample counts: pass the split's dataset.json "
                             "(with shard_root= for remote shards) instead of a URL list")
        batches = math.ceil(math.ceil(src.samples / world) / micro_batch)  # the most any rank needs
        return src.samples, batches, batches
    accumulation = accumulation_steps(global_batch, micro_batch, world)
    samples = samples_per_epoch if samples_per_epoch is not None else src.samples
    if samples is None:
        raise ValueError("tar URLs carry no sample count: pass samples_per_epoch (the number of samples in "
                         "these shards), or pass the dataset.json written by data_prep")
    steps = samples // global_batch
    if steps < 1:
        what = "samples_per_epoch" if samples_per_epoch is not None else "the split's samples"
        raise ValueError(f"{what} ({samples}) is less than one global batch ({global_batch}): lower the global "
                         "batch, or train on more samples")
    if not resampled and len(src.shards) < world * readers:
        raise ValueError(f"{len(src.shards)} shards for {world} ranks x {readers} workers = {world * readers} "
                         "readers: every reader needs a shard of its own. Write more (smaller) shards, use fewer "
                         "workers, or pass resampled=True to draw shards with replacement")
    return samples, steps, steps * accumulation


def _check_args(data: DataCfg, *, train: bool, micro_batch: int, global_batch: int | None) -> None:
    """Clear errors for arguments that cannot work, before any shard is opened."""
    if not isinstance(data, DataCfg):
        raise TypeError(f"build_loader takes a DataCfg (data_prep.stream.DataCfg(path=...)), not "
                        f"{type(data).__name__}")
    if train and global_batch is None:
        raise ValueError("training needs global_batch (images per optimizer step over all ranks = micro_batch x "
                         "accumulation x world size)")
    if not train and global_batch is not None:
        raise ValueError(f"eval takes micro_batch ({micro_batch}) images per rank per batch; global_batch "
                         f"({global_batch}) is for training only: drop it")
    if data.decode not in ("cpu", "gpu"):
        raise ValueError(f"decode must be 'cpu' or 'gpu', not {data.decode!r}")
    if data.workers < 0 or micro_batch < 1:
        raise ValueError(f"workers ({data.workers}) must be >= 0 and micro_batch ({micro_batch}) >= 1")
    if data.num_classes is not None and data.num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 or None (from dataset.json), got {data.num_classes}")


@dataclasses.dataclass(frozen=True)
class LoaderPlan:
    """What `plan_loader` found: the source, readers (workers) per rank, and the epoch's arithmetic."""

    source: Source
    readers: int
    resampled: bool
    samples: int  # per epoch
    steps: int  # optimizer steps per epoch (training), eval batches per rank (eval)
    batches: int  # micro-batches per rank per epoch


def plan_loader(data: DataCfg, split: str, *, train: bool, micro_batch: int, world: int,
                global_batch: int | None = None) -> LoaderPlan:
    """Every check `build_loader` makes before it starts a worker: the arguments, the source (dataset.json,
    split, shards present), the classes, and the epoch (at least one global batch of samples; a shard per
    reader unless resampled). Raises ValueError / FileNotFoundError naming the fix. The trainer's preflight
    calls it, so that data its loaders cannot read is refused before any run dir exists."""
    _check_args(data, train=train, micro_batch=micro_batch, global_batch=global_batch)
    src = resolve_source(data.path, split, data.shard_root)
    if data.num_classes is not None and src.classes and data.num_classes < len(src.classes):
        raise ValueError(f"num_classes {data.num_classes} is less than the {len(src.classes)} classes of "
                         f"{data.path}: raise it, or leave it unset to take the dataset's")
    readers = max(1, data.workers)
    resampled = data.resampled and train  # eval reads the split in written order, whatever the config says
    samples, steps, batches = _plan(src, train=train, global_batch=global_batch, micro_batch=micro_batch,
                                    world=world, readers=readers,
                                    samples_per_epoch=data.samples_per_epoch if train else None, resampled=resampled)
    return LoaderPlan(src, readers, resampled, samples, steps, batches)


def build_loader(data: DataCfg, split: str, *, train: bool, dist_env: DistEnv, image_size: int | tuple[int, int],
                 micro_batch: int, seed: int, global_batch: int | None = None,
                 device: torch.device | str | None = None, with_keys: bool = False) -> StreamLoader:
    """Build one rank's loader over `split` of `data.path` (dataset.json, its folder, a brace pattern or URLs).

    train: random-resized crops + flips (+ RandAugment), shuffled, `global_batch` required (checked against
    micro_batch x accumulation x world; clear error otherwise). Else the eval pass: resize to image_size /
    crop_pct, centre crop, written order, label -1 padding, `micro_batch` per rank and no global_batch; the
    training-only fields (samples_per_epoch, resampled, scale, ratio, hflip, randaugment) do not apply.
    decode="gpu" ships the encoded bytes and decodes on `device` in this process, on a background thread
    (data_prep/gpu_decode.py). with_keys: yield
    (images, labels, keys). data.num_classes, if set, bounds the labels (others count as bad_label).
    """
    plan = plan_loader(data, split, train=train, micro_batch=micro_batch, global_batch=global_batch,
                       world=dist_env.world_size)
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = StreamConfig(source=plan.source, split=split, train=train, size=to_hw(image_size), micro_batch=micro_batch,
                       batches=plan.batches, rank=dist_env.rank, world_size=dist_env.world_size,
                       workers=plan.readers, seed=seed, samples_per_epoch=plan.samples, resampled=plan.resampled,
                       decode=data.decode, crop_pct=data.crop_pct,
                       interpolation=data.interpolation or DEFAULT_INTERPOLATION,
                       scale=tuple(data.scale), ratio=tuple(data.ratio), hflip=data.hflip, randaugment=data.randaugment,
                       shuffle_buffer=data.shuffle_buffer, min_size=data.min_size, num_classes=data.num_classes)
    # pinned batches: uint8 images copy to the GPU asynchronously, and so do decode="gpu"'s encoded bytes
    pin = dev.type == "cuda" and torch.cuda.is_available()
    return StreamLoader(ShardStream(cfg), workers=data.workers, steps_per_epoch=plan.steps,
                        global_batch=global_batch, device=dev, pin_memory=pin, prefetch=data.prefetch,
                        timeout_s=data.timeout_s, with_keys=with_keys)
