"""The part of the stream that runs inside DataLoader workers: raw samples -> uint8 micro-batches.

Each worker of each rank is a "reader slot" that produces a fixed list of micro-batches per epoch: batch i of
the rank (0-based) is made by slot i % workers. Its samples, crops and flips are a pure function of (seed,
epoch, rank, slot, batch index), so a resumed worker regenerates its sequence and skips, without decoding,
the batches already delivered. The DataLoader asks workers round-robin starting at worker 0, so a pass that
begins at batch k rotates the slots: worker w plays slot (w + k) % workers, which keeps the order exact.
In training the workers run on from one epoch into the next without a restart (the loader cuts the
stream into epochs), the rotation shifted by the epoch's batch count.

Faulty samples never change the batch size or the position arithmetic: in training a corrupt, missing or too
small image or a bad label is replaced by its nearest good neighbour in the same micro-batch (a filler with
label -1 if there is none); in eval it becomes a filler with label -1, which the trainers leave out of
top-1/top-5.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import resource_sharer
from types import TracebackType

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_prep.images import MIN_SIZE
from data_prep.stream_source import (
    IMAGE_EXTS,
    Counters,
    Source,
    batches_of,
    derive_seed,
    range_samples,
    train_samples,
)
from data_prep.transforms import (
    center_crop_box,
    crop_resize_pil,
    image_header,
    parse_randaugment,
    pil_to_chw,
    random_resized_crop_box,
    seeded_torch_rng,
)
from runtime.dist import is_distributed

FILLER_LABEL = -1
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_preemption_signals(worker_id: int | None = None) -> None:
    """In a DataLoader worker (its `worker_init_fn`): ignore the signals that announce a preemption.

    SLURM sends them to every process of the job; they are the training process's to handle: it checkpoints,
    then stops these workers itself (close, collection or exit: see data_prep/stream.py). A worker dying of one
    would crash the run before its checkpoint. Ctrl-C is the main process's too: it exits, which stops them.
    """
    for sig in PREEMPTION_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION_SIGNALS)  # blocked since the fork: a pending one is dropped


def quiet_abandoned_handoffs() -> None:
    """In a DataLoader worker: no traceback when the training process drops a batch's handoff half-way.

    A batch's tensors reach the training process as file descriptors, which it fetches from this worker's
    `multiprocessing.resource_sharer` thread. Interrupted in that fetch (a second Ctrl-C stops it at once), it
    hangs up, and the thread reports the reset through `sys.excepthook`: a worker's traceback on the console
    about a stop the training process reports itself. Only that report is dropped: a handoff that fails still
    fails in the training process, and every other exception is reported as before.
    """
    report = sys.excepthook
    if getattr(report, "quiet_handoffs", False):  # installed already (worker_init_fn, then __iter__)
        return

    def excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        if issubclass(kind, (ConnectionError, EOFError)) and _raised_in(tb, resource_sharer.__file__):
            return
        report(kind, value, tb)

    excepthook.quiet_handoffs = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def _raised_in(tb: TracebackType | None, filename: str) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            return True
        tb = tb.tb_next
    return False


def init_worker(worker_id: int | None = None) -> None:
    """A DataLoader worker's `worker_init_fn`: `ignore_preemption_signals`, `quiet_abandoned_handoffs`."""
    ignore_preemption_signals()
    quiet_abandoned_handoffs()


@contextlib.contextmanager
def preemption_signals_blocked() -> Iterator[None]:
    """Start workers inside this: a forked worker is born with the preemption signals blocked, so one that arrives
    before its `worker_init_fn` ignores them stays pending (then dropped) instead of killing it; the loader would
    wait on the dead worker for ever. The calling thread gets its signals once the block ends (none is lost)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# How long the forking thread gives up the GIL before a fork while a process group is up. When a collective
# completes, a process-group thread (gloo's run loop) takes a Python thread state to drop its references, a
# moment after the main thread's wait() returned; a child forked while that thread holds the interpreter's
# thread-state lock deadlocks before running a line (CPython gh-112275: 3.11 before 3.11.10, 3.10 and earlier;
# the child waits in PyOS_AfterFork_Child for a lock no thread of it will release). An eval's workers are
# forked just after the step's logging collectives: bench/fork_settle.py, that pattern on 2 cores, hung 8 of
# 3,494 plain forks and 0 of 5,278 with this pause (docs/architecture.md, "Loader workers are forked"). Time out
# of the GIL lets that thread finish first; a fork happens a few times per run, so the pause costs nothing.
FORK_SETTLE_S = 0.05


@contextlib.contextmanager
def forking_workers() -> Iterator[None]:
    """Start a DataLoader's workers (its first `iter()`) inside this: the process group's threads settle first
    (FORK_SETTLE_S), and the workers are born with the preemption signals blocked
    (`preemption_signals_blocked`)."""
    if is_distributed():
        _settle()
    with preemption_signals_blocked():
        yield


def _settle() -> None:
    time.sleep(FORK_SETTLE_S)  # out of the GIL


@dataclass(frozen=True)
class StreamConfig:
    """Everything a worker needs; identical on every rank except `rank`."""

    source: Source
    split: str
    train: bool
    size: tuple[int, int]  # (H, W) of the output images
    micro_batch: int
    batches: int  # micro-batches per rank per epoch
    rank: int
    world_size: int
    workers: int  # reader slots per rank: DataLoader workers, or 1 without workers
    seed: int
    samples_per_epoch: int
    resampled: bool = False
    decode: str = "cpu"  # "cpu": decode in workers; "gpu": workers ship bytes + boxes
    crop_pct: float = 0.875
    interpolation: str = "bilinear"  # PIL's resize filter (decode="gpu": the same, data_prep/resample.py)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    randaugment: str | None = None
    shuffle_buffer: int = 500
    min_size: int = MIN_SIZE  # images whose shorter side is under this are skipped as too_small
    num_classes: int | None = None  # labels must be below this (and below len(source.classes) if known)


def substitute_index(ok: list[bool], i: int) -> int | None:
    """The nearest good entry to a failed entry `i` of a micro-batch (earlier one first), or None."""
    for d in range(1, len(ok)):
        for j in (i - d, i + d):
            if 0 <= j < len(ok) and ok[j]:
                return j
    return None


class ShardStream(IterableDataset):
    """Yields one rank's micro-batches from the (epoch, batch) set in `position`, as dicts (see `_assemble`): in
    training endlessly, epoch after epoch; in eval, the one pass."""

    def __init__(self, cfg: StreamConfig):
        super().__init__()
        self.cfg = cfg
        # [epoch, first batch] of the next pass, written by the main process before each pass; shared memory
        # so that persistent workers see it when the DataLoader restarts them
        self.position = torch.zeros(2, dtype=torch.int64).share_memory_()
        self.randaugment = parse_randaugment(cfg.randaugment) if cfg.train else None

    def set_position(self, epoch: int, batch: int) -> None:
        self.position.copy_(torch.tensor([epoch, batch]))

    def __iter__(self) -> Iterator[dict]:
        cfg, info = self.cfg, get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None:  # again here, for a DataLoader built without our worker_init_fn
            init_worker()
        if info is not None and info.num_workers != cfg.workers:
            raise RuntimeError(f"stream built for {cfg.workers} workers runs in {info.num_workers}")
        epoch, start = self.position.tolist()
        shift = start  # this pass's batch r (counted from its start) goes to worker r % workers
        while True:
            yield from self._slot_batches(epoch, (worker + shift) % cfg.workers, start)
            if not cfg.train:
                return
            # Training runs on into the next epoch, so the workers decode its first batches while the trainer is
            # still on this one's last (the loader takes `len(loader)` batches per pass). The DataLoader asks
            # its workers round-robin without a break: batch 0 of the next epoch goes to the worker after the one
            # that made this epoch's last batch, so the slots rotate by the epoch's batches.
            epoch, shift, start = epoch + 1, shift - cfg.batches, 0

    def _slot_batches(self, epoch: int, slot: int, start: int) -> Iterator[dict]:
        """The batches of `slot` in `epoch` from the rank's batch `start` on (the earlier ones skipped, undecoded)."""
        cfg = self.cfg
        done, total = batches_of(slot, start, cfg.workers), batches_of(slot, cfg.batches, cfg.workers)
        counters = Counters()
        raw = self._raw_samples(epoch, slot, counters)
        counters.muted = True  # what is skipped was counted by the run that delivered it
        for _ in itertools.islice(raw, done * cfg.micro_batch):
            pass
        counters.muted = False
        for j in range(done, total):
            items = list(itertools.islice(raw, cfg.micro_batch))
            yield self._batch(items, epoch, slot, j, counters)

    def _raw_samples(self, epoch: int, slot: int, counters: Counters) -> Iterator[dict | None]:
        """This slot's raw samples for the epoch; None entries are eval padding."""
        cfg, mb, w = self.cfg, self.cfg.micro_batch, self.cfg.workers
        before = sum(batches_of(s, cfg.batches, w) for s in range(slot)) * mb  # earlier slots of this rank
        mine = batches_of(slot, cfg.batches, w) * mb
        if cfg.train:
            return train_samples(cfg.source, seed=cfg.seed, epoch=epoch, slot=cfg.rank * w + slot,
                                 slots=cfg.world_size * w, start=cfg.rank * cfg.batches * mb + before, needed=mine,
                                 resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, counters=counters)
        # eval: rank r holds samples [r T / world, (r + 1) T / world) in written order, slot by slot, then padding
        total = cfg.samples_per_epoch
        lo, hi = cfg.rank * total // cfg.world_size, (cfg.rank + 1) * total // cfg.world_size
        a, b = min(lo + before, hi), min(lo + before + mine, hi)
        return itertools.chain(range_samples(cfg.source, a, b, counters), itertools.repeat(None))

    def _prepare(self, item: dict | None, rng: random.Random, counters: Counters) -> tuple | None:
        """(image tensor or (bytes, box, flip), label, key) for one raw sample; None if padding or faulty.

        decode="gpu" ships (bytes, box, flip) for the JPEGs nvJPEG can batch and decodes the rest here."""
        cfg = self.cfg
        if item is None:
            return None
        url = item.get("__url__")
        # a sample past this reader's share (read after a truncated shard) is another reader's to count
        count = counters.add if item.get("__owned__", True) else lambda *a, **k: None
        try:
            label = int(item["cls"])
            if (label < 0 or (cfg.source.classes and label >= len(cfg.source.classes))
                    or (cfg.num_classes is not None and label >= cfg.num_classes)):
                raise ValueError(label)
        except (KeyError, ValueError):
            count("bad_label", shard=url)
            return None
        ext = next((e for e in IMAGE_EXTS if e in item), None)
        if ext is None:
            count("missing_image", shard=url)
            return None
        data = item[ext]
        try:  # PIL raises many types on bad data (OSError, SyntaxError, ValueError, DecompressionBombError)
            width, height, batchable = image_header(data)
            if min(width, height) < cfg.min_size:
                # the writer's too_small rule, for shards written by other tools: a crop of a 1x1 image
                # upscaled to the model's size carries no picture, only a label
                count("too_small", shard=url)
                return None
            if cfg.train:
                box = random_resized_crop_box(width, height, rng, cfg.scale, cfg.ratio)
                flip = rng.random() < cfg.hflip
            else:
                box, flip = center_crop_box(width, height, cfg.size, cfg.crop_pct), False
            if cfg.decode == "gpu" and batchable:
                return (data, box, flip), label, item["__key__"]
            # the CPU path, and on the device path the images nvJPEG cannot batch (same box, same flip)
            img = crop_resize_pil(data, box, cfg.size, flip, cfg.interpolation)
            if self.randaugment is not None and cfg.decode == "cpu":  # decode="gpu": on the device, for all
                img = self.randaugment(img)
            return pil_to_chw(img), label, item["__key__"]
        except Exception:
            count("corrupt_image", shard=url)
            return None

    def _batch(self, items: list[dict | None], epoch: int, slot: int, index: int, counters: Counters) -> dict:
        cfg = self.cfg
        rng = random.Random(derive_seed(cfg.seed, epoch, cfg.rank, slot, index, "aug"))
        ra_seed = derive_seed(cfg.seed, epoch, cfg.rank, slot, index, "randaugment")
        with seeded_torch_rng(ra_seed) if self.randaugment is not None else contextlib.nullcontext():
            prepared = [self._prepare(item, rng, counters) for item in items]
        ok = [p is not None for p in prepared]
        for i, p in enumerate(prepared):
            if p is None:
                if items[i] is None:
                    counters.add("padding")
                    continue
                j = substitute_index(ok, i) if cfg.train else None
                prepared[i] = prepared[j] if j is not None else None
                counters.add("substituted" if j is not None else "filler")
        counters.add("samples", sum(ok))
        out = self._assemble(prepared)
        out.update(epoch=epoch, slot=slot, index=index, stats=counters.take())
        return out

    def _assemble(self, prepared: list[tuple | None]) -> dict:
        """Stack a micro-batch: labels int64 (B,), keys, and images uint8 (B, 3, H, W) or, for device decoding,
        `data` uint8 (total bytes,) with `lengths` (B,; 0 where no bytes are shipped), `boxes` (B, 4), `flips`
        (B,), and the images decoded here: `images` uint8 (K, 3, H, W) for the entries `cpu_index` (K,)."""
        h, w = self.cfg.size
        n = len(prepared)
        labels = torch.tensor([p[1] if p else FILLER_LABEL for p in prepared], dtype=torch.int64)
        keys = [p[2] if p else "" for p in prepared]
        if self.cfg.decode != "gpu":
            images = torch.zeros((n, 3, h, w), dtype=torch.uint8)
            for i, p in enumerate(prepared):
                if p is not None:
                    images[i] = p[0]
            return {"images": images, "labels": labels, "keys": keys}
        decoded = [i for i, p in enumerate(prepared) if p is not None and isinstance(p[0], torch.Tensor)]
        shipped = [p[0] if p is not None and not isinstance(p[0], torch.Tensor) else None for p in prepared]
        blobs = [s[0] if s else b"" for s in shipped]
        return {
            "data": torch.frombuffer(bytearray(b"".join(blobs)) or bytearray(1), dtype=torch.uint8),
            "lengths": torch.tensor([len(b) for b in blobs], dtype=torch.int64),
            "boxes": torch.tensor([s[1] if s else (0, 0, 1, 1) for s in shipped], dtype=torch.int64),
            "flips": torch.tensor([bool(s and s[2]) for s in shipped]),
            "images": (torch.stack([prepared[i][0] for i in decoded]) if decoded
                       else torch.zeros((0, 3, h, w), dtype=torch.uint8)),
            "cpu_index": torch.tensor(decoded, dtype=torch.int64),
            "labels": labels,
            "keys": keys,
        }
