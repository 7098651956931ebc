"""decode="gpu", the training process's half: encoded JPEGs -> cropped uint8 micro-batches on the device.

The workers ship, per micro-batch, the bytes of the baseline JPEGs with their crop boxes and flips (drawn by
the same seeded RNG as on the CPU path), and the few images nvJPEG cannot batch (progressive, CMYK,
greyscale, EXIF-rotated, PNG...) already cropped by PIL (data_prep/stream_worker.py). Here:

- `crop_resize_batch`: every crop + resize + flip of a micro-batch at once, with PIL's own filters and
  fixed-point arithmetic (data_prep/resample.py) over the decoded images padded into one tensor: PIL's bytes,
  for bilinear and bicubic, with no kernels per image but the padding copy.
- `decoders`: TorchCodec's image decoders, or torchvision's where TorchCodec does not load.
- `DeviceDecoder`: one micro-batch: batched `decode_jpeg`, `crop_resize_batch`, the worker-decoded images put
  in place, failed images replaced by a neighbour. On CUDA it decodes on one stream of its own and crops on
  another, so that batch k's crop kernels run while batch k+1 decodes, and records an event.
- `decode_ahead`: runs the decoder on a background thread, `ahead` micro-batches ahead of the training thread,
  which then only makes its stream wait on the event (`receive`): nvJPEG's host synchronisation and the
  Python per batch happen beside the training step, not in it. On a CPU device the same thread runs, and
  there is nothing to wait on.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from data_prep.resample import resample_batch
from data_prep.stream_worker import FILLER_LABEL, StreamConfig, substitute_index
from runtime.logs import get_logger

DECODE_AHEAD = 2  # micro-batches decoded ahead of the one being trained on
PAD_BUDGET_BYTES = 1 << 30  # int32 bytes of one padded resample batch; a batch of huge images goes in chunks
JOIN_AT_EXIT_S = 5.0

# decode threads alive in this process, by key: stopped at interpreter exit before the workers (data_prep.stream)
_THREADS: dict[int, tuple[threading.Thread, threading.Event, queue.SimpleQueue]] = {}
_KEYS = itertools.count()


def _to_device(values: list | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host tensor on `device` without a stream synchronisation (a copy from pageable memory waits for
    the stream's queued work; one from pinned memory does not)."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _pad(images: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, Wmax, 3, Hmax), image i's pixel (c, y, x) at [i, x, c, y] (columns first: the horizontal pass
    gathers whole columns), anything past an image zero (never read: data_prep/resample.py), and the images'
    (h, w) as a (B, 2) tensor on `device`."""
    sizes = _to_device([list(im.shape[-2:]) for im in images], device, torch.float64)
    if all(im.shape == images[0].shape for im in images):  # e.g. a dataset resized to one size: no padding
        return torch.stack([im.permute(2, 0, 1) for im in images]), sizes
    out = torch.zeros((len(images), max(im.shape[-1] for im in images), 3, max(im.shape[-2] for im in images)),
                      dtype=torch.uint8, device=device)
    for i, im in enumerate(images):
        out[i, : im.shape[-1], :, : im.shape[-2]] = im.permute(2, 0, 1)  # one copy kernel per image
    return out, sizes


def _chunks(images: list[torch.Tensor], budget: int = PAD_BUDGET_BYTES) -> list[list[int]]:
    """Indices of `images` in groups whose padded tensor, counted as int32 (the resample's sums), fits `budget`:
    all in order when they fit (the usual case), else by size, so that a few huge images do not pad the whole
    batch to their size."""
    def padded_bytes(n: int, h: int, w: int) -> int:
        return n * 3 * h * w * 4

    if padded_bytes(len(images), max(im.shape[-2] for im in images), max(im.shape[-1] for im in images)) <= budget:
        return [list(range(len(images)))]
    order = sorted(range(len(images)), key=lambda i: images[i].shape[-2] * images[i].shape[-1])
    groups: list[list[int]] = []
    h = w = 0
    for i in order:
        nh, nw = max(h, images[i].shape[-2]), max(w, images[i].shape[-1])
        if groups and padded_bytes(len(groups[-1]) + 1, nh, nw) <= budget:
            groups[-1].append(i)
            h, w = nh, nw
        else:
            groups.append([i])
            h, w = images[i].shape[-2], images[i].shape[-1]
    return groups


def crop_resize_batch(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor,
                      size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Crop box i of image i (uint8 (3, h_i, w_i), one device), resize to `size` (h, w) with PIL's
    `interpolation` filter, flip where `flips`: PIL's pixels, as the CPU path's `crop_resize_pil` gives them
    from the same decoded image (data_prep/resample.py).

    boxes: (B, 4) as (left, top, width, height) in source pixels; flips: (B,) bool, both on the host.
    Returns uint8 (B, 3, h, w): a few batched kernels per filter tap, per group of images (one group unless
    they are huge).
    """
    device = images[0].device
    groups = _chunks(images)
    out = None if len(groups) == 1 else torch.empty((len(images), 3, *size), dtype=torch.uint8, device=device)
    for group in groups:
        padded, sizes = _pad([images[i] for i in group], device)
        box = boxes[group]
        max_scale = max((box[:, 2] / size[1]).max().item(), (box[:, 3] / size[0]).max().item())  # host values
        crops = resample_batch(padded, sizes, _to_device(box, device, torch.float64),
                               _to_device(flips[group], device), size, interpolation, max_scale)
        if out is None:
            return crops
        out[_to_device(group, device)] = crops
    return out


class Decoders(NamedTuple):
    """The image decoders of one library, with its name (logs, bench/loader.py)."""

    library: str
    jpeg: Callable  # (1-D uint8 tensor or a list of them, mode=, device=) -> (3, h, w) uint8 or a list: nvJPEG on CUDA
    image: Callable  # (1-D uint8 tensor, mode=) -> (3, h, w) uint8 on the CPU, any format


@functools.cache
def decoders() -> Decoders:
    """TorchCodec's decoders, or torchvision's where TorchCodec does not load (logged once, with the reason).

    torchvision deprecated its image decoders in 0.29 for TorchCodec's (from 0.16): the same libjpeg-turbo and
    nvJPEG, the same pixels (tests/test_gpu_decode.py), on the caller's current CUDA stream, host-synchronised
    before they return, as torchvision's. TorchCodec's wheels are built for one CUDA major (13 for 0.17): beside a
    CPU-only torch, or one built for another CUDA, its image library does not load. Both are imported here, not
    with the module: torchvision's import costs a process ~2 s of CPU (it loads torch._dynamo), which every
    decode="cpu" run, fine-tuning rank and CLI would pay for nothing.
    """
    try:
        from torchcodec.decoders import decode_image, decode_jpeg

        return Decoders("torchcodec", decode_jpeg, decode_image)
    except Exception as e:  # ImportError, or OSError/RuntimeError from loading its library
        why = f"{type(e).__name__}: {e}".splitlines()[0]
    from torchvision.io import decode_image, decode_jpeg

    build = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"  # this torch's, e.g. cu126
    get_logger().warning(f'decode="gpu": TorchCodec\'s image decoders do not load ({why}); using torchvision\'s, '
                         "deprecated since torchvision 0.29. TorchCodec built for this torch: "
                         f"pip install torchcodec --index-url https://download.pytorch.org/whl/{build}")
    return Decoders("torchvision", decode_jpeg, decode_image)


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """One image on `device`, falling back to the CPU decoders; None if unreadable."""
    lib = decoders()
    try:
        return lib.jpeg(data, mode="RGB", device=device)
    except RuntimeError:
        pass
    try:
        return lib.image(data, mode="RGB").to(device)
    except (RuntimeError, ValueError):  # ValueError: TorchCodec, for a format it does not know
        return None


def _decode(blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    try:  # one batched call (nvJPEG on CUDA); one bad image makes it fail as a whole
        return list(decoders().jpeg(blobs, mode="RGB", device=device))
    except RuntimeError:
        return [_decode_one(b, device) for b in blobs]


class DeviceDecoder:
    """Turns a worker's decode="gpu" micro-batch (see ShardStream._assemble) into uint8 images on `device`."""

    def __init__(self, cfg: StreamConfig, device: torch.device):
        self.cfg = cfg
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            # resolved here, on the caller's thread: the decode thread's current device is 0, not the caller's
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None  # (decode, crop): first use

    def __call__(self, batch: dict) -> dict:
        """The batch with `images` uint8 (B, 3, H, W) on the device, labels/keys of replaced images updated,
        decode faults added to its stats, and `ready`: the CUDA event after which the images may be read
        (None off CUDA; see `receive`)."""
        if self.device.type != "cuda":
            return self._decode_batch(batch)
        if self._streams is None:  # made here, on the decode thread, on the first batch
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        crop_stream = self._streams[1]
        with torch.cuda.device(self.device), torch.cuda.stream(crop_stream):
            out = self._decode_batch(batch)
            out["ready"] = torch.cuda.Event()
            out["ready"].record(crop_stream)
        return out

    def _decode_jpegs(self, blobs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """`_decode` on the device. On CUDA it runs on the decode stream: the decoders enqueue on the current
        stream and host-synchronise it before they return, so on the crop stream (current here) the decode would
        first wait for the previous batch's crop kernels; on a stream of its own it overlaps them."""
        if self._streams is None:
            return _decode(blobs, self.device)
        decode_stream, crop_stream = self._streams
        with torch.cuda.stream(decode_stream):
            decoded = _decode(blobs, self.device)
        crop_stream.wait_stream(decode_stream)  # nvJPEG's work is host-synchronised; a fallback's copies may not be
        for img in decoded:
            if img is not None:  # decode_stream's memory, read on crop_stream: not reused before those reads ran
                img.record_stream(crop_stream)
        return decoded

    def _decode_batch(self, batch: dict) -> dict:
        cfg, dev = self.cfg, self.device
        labels, keys = batch["labels"].clone(), list(batch["keys"])
        lengths = batch["lengths"].tolist()
        blobs = torch.split(batch["data"][: sum(lengths)], lengths)
        images = torch.zeros((len(keys), 3, *cfg.size), dtype=torch.uint8, device=dev)
        ok = [False] * len(keys)
        cpu_index = batch["cpu_index"].tolist()
        if cpu_index:  # decoded by the workers (pinned on CUDA: the copy runs on this thread's stream)
            images[_to_device(cpu_index, dev)] = batch["images"].to(dev, non_blocking=True)
            for i in cpu_index:
                ok[i] = True
        present = [i for i, n in enumerate(lengths) if n > 0]
        decoded = self._decode_jpegs([blobs[i] for i in present]) if present else []
        good, boxes = [], batch["boxes"].tolist()
        for i, img in zip(present, decoded, strict=True):
            left, top, w, h = boxes[i]
            if img is not None and img.shape[-2] >= top + h and img.shape[-1] >= left + w:
                good.append((i, img))
        if good:
            idx = [i for i, _ in good]
            images[_to_device(idx, dev)] = crop_resize_batch(
                [img for _, img in good], batch["boxes"][idx], batch["flips"][idx], cfg.size, cfg.interpolation)
            for i in idx:
                ok[i] = True
        self._replace_failed([i for i in present if not ok[i]], ok, images, labels, keys, batch["stats"]["counts"])
        return {"images": images, "labels": labels, "keys": keys, "stats": batch["stats"], "slot": batch["slot"],
                "index": batch["index"], "ready": None}

    def _replace_failed(self, failed: list[int], ok: list[bool], images: torch.Tensor, labels: torch.Tensor,
                        keys: list[str], counts: dict[str, int]) -> None:
        """As the workers do for what they find faulty: a corrupt image is counted and replaced by its nearest
        good neighbour (train) or a label -1 filler (eval, or no good neighbour)."""
        for i in failed:
            j = substitute_index(ok, i) if self.cfg.train else None
            if j is None:
                images[i], labels[i], keys[i] = 0, FILLER_LABEL, ""
            else:
                images[i], labels[i], keys[i] = images[j], labels[j], keys[j]
            for name, n in (("corrupt_image", 1), ("samples", -1), ("filler" if j is None else "substituted", 1)):
                counts[name] = counts.get(name, 0) + n


def receive(batch: dict) -> torch.Tensor:
    """On the training thread: its CUDA stream waits (on the GPU, the host does not) for the decode of
    `batch`, and the images' memory is marked as in use by that stream (the decoder's stream allocated it)."""
    images, ready = batch["images"], batch["ready"]
    if ready is not None:
        stream = torch.cuda.current_stream(images.device)
        stream.wait_event(ready)
        images.record_stream(stream)
    return images


def _serve(decode: Callable[[dict], dict], jobs: queue.SimpleQueue, results: queue.SimpleQueue,
           stop: threading.Event) -> None:
    """The decode thread: decode jobs in order until None; after `stop`, skip what is left."""
    while (batch := jobs.get()) is not None:
        if stop.is_set():
            continue
        try:
            results.put(decode(batch))
        except BaseException as e:  # handed to the training thread, which raises it
            results.put(e)
            return


def decode_ahead(batches: Iterator[dict], decode: Callable[[dict], dict], ahead: int = DECODE_AHEAD
                 ) -> Iterator[dict]:
    """`decode(b) for b in batches`, computed on a background thread up to `ahead` batches ahead, in order.

    The thread ends when this generator does: exhausted, closed (a new pass, `close()`), garbage-collected, or
    at interpreter exit (`stop_all`). It never touches the DataLoader: the batches are pulled here, on the
    consumer's thread, so stopping it cannot race with the DataLoader's own shutdown.
    """
    jobs, results, stop = queue.SimpleQueue(), queue.SimpleQueue(), threading.Event()
    thread = threading.Thread(target=_serve, args=(decode, jobs, results, stop), name="vitscale-gpu-decode",
                              daemon=True)  # daemon: an exit never waits on it (stop_all ends it first anyway)
    key = next(_KEYS)
    _THREADS[key] = (thread, stop, jobs)
    thread.start()
    pending = 0
    try:
        for batch in batches:
            jobs.put(batch)
            pending += 1
            if pending > ahead:
                pending -= 1
                yield _result(results)
        while pending:
            pending -= 1
            yield _result(results)
    finally:
        stop.set()
        jobs.put(None)
        thread.join()  # at most the decode in progress
        _THREADS.pop(key, None)


def _result(results: queue.SimpleQueue) -> dict:
    out = results.get()
    if isinstance(out, BaseException):
        raise out
    return out


def stop_all(timeout_s: float = JOIN_AT_EXIT_S) -> None:
    """Stop every decode thread of this process (interpreter exit: the generators may never be closed)."""
    for key in list(_THREADS):
        thread, stop, jobs = _THREADS.pop(key)
        stop.set()
        jobs.put(None)
        with contextlib.suppress(RuntimeError):  # a thread that was never started (fork copy)
            thread.join(timeout_s)
