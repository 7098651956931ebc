"""decode="gpu" on the CPU device (the decoders' CPU decode_jpeg stands in for nvJPEG): the batched crop against
PIL's, the worker-side decode of what nvJPEG cannot batch, exact resume, the decode thread's lifetime, and the
same pixels from TorchCodec's decoders and from torchvision's (the fallback where TorchCodec does not load).

The batched crop (data_prep/resample.py) computes PIL's fixed-point resize in float64: on the same decoded pixels,
boxes and flips it gives PIL's bytes exactly, bilinear and bicubic alike, so the tests compare with `==`.
"""

from __future__ import annotations

import gc
import hashlib
import io
import itertools
import json
import logging
import random
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep import gpu_decode, stream_worker
from data_prep.stream import DataCfg, build_loader
from data_prep.transforms import image_header, random_resized_crop_box
from runtime.dist import DistEnv
from tests.stream_fixtures import crc, make_jpeg, write_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from loader import photo  # noqa: E402 (bench/loader.py's photo-like JPEG: gradients + texture noise)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU check runs both
THREAD = "vitscale-gpu-decode"
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def _decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD]


def _wait_no_threads(seconds: float = 10.0) -> list[threading.Thread]:
    deadline = time.monotonic() + seconds
    while _decode_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    return _decode_threads()


@pytest.fixture(params=["torchcodec", "torchvision"])
def library(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """decode="gpu" on the decoders of one library: TorchCodec's (the default) or torchvision's (the fallback,
    whose every call warns that torchvision 0.29 deprecated it: known, so that warning alone is not shown)."""
    if request.param == "torchcodec":
        from torchcodec.decoders import decode_image, decode_jpeg
    else:
        from torchvision.io import decode_image, decode_jpeg
    chosen = gpu_decode.Decoders(request.param, decode_jpeg, decode_image)
    monkeypatch.setattr(gpu_decode, "decoders", lambda: chosen)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                DeprecationWarning)
        yield request.param


def test_torchcodec_decodes_and_torchvision_stands_in_where_it_does_not_load(monkeypatch: pytest.MonkeyPatch,
                                                                              caplog: pytest.LogCaptureFixture
                                                                              ) -> None:
    gpu_decode.decoders.cache_clear()
    assert gpu_decode.decoders().library == "torchcodec"  # the pinned install (constraints.txt) loads beside torch
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if not installed: its import raises
    monkeypatch.setattr(logging.getLogger("vitscale"), "propagate", True)  # setup_logging turns it off
    gpu_decode.decoders.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="vitscale"):
            fallback = gpu_decode.decoders()
            assert gpu_decode.decoders() is fallback  # chosen once per process: one warning
    finally:
        gpu_decode.decoders.cache_clear()
    assert fallback.library == "torchvision" and fallback.jpeg.__module__ == "torchvision.io.image"
    [warning] = [r.getMessage() for r in caplog.records]
    build = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"  # cu130 for the pinned torch
    assert "TorchCodec" in warning and "ModuleNotFoundError" in warning
    assert warning.endswith(f"pip install torchcodec --index-url https://download.pytorch.org/whl/{build}")


def _pixels(data: bytes) -> tuple[np.ndarray, torch.Tensor]:
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return arr, torch.from_numpy(arr.copy()).permute(2, 0, 1)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("wh", "size"), [((500, 375), (224, 224)), ((1000, 750), (96, 128)), ((64, 48), (40, 40))])
def test_batched_crop_is_pils_resize_to_the_byte(device: str, wh: tuple, size: tuple, interpolation: str) -> None:
    # different sources in one batch (padding), downscales and upscales, flips; the same decoded pixels as PIL's
    rng = random.Random(1)
    sources = [_pixels(photo(i, *(wh if i % 2 else (wh[0] * 3 // 4, wh[1])))) for i in range(3)]
    picks = [sources[i % 3] for i in range(24)]
    boxes = [random_resized_crop_box(a.shape[1], a.shape[0], rng) for a, _ in picks]
    boxes[0] = (0, 0, picks[0][0].shape[1], picks[0][0].shape[0])  # the whole image: both edges touched
    flips = [rng.random() < 0.5 for _ in boxes]
    out = gpu_decode.crop_resize_batch([t.to(device) for _, t in picks], torch.tensor(boxes), torch.tensor(flips),
                                       size, interpolation)
    assert out.shape == (24, 3, *size) and out.dtype == torch.uint8 and out.device.type == device
    for k, ((arr, _), (left, top, w, h), flip) in enumerate(zip(picks, boxes, flips, strict=True)):
        ref = Image.fromarray(arr).resize(size[::-1], RESAMPLE[interpolation], box=(left, top, left + w, top + h))
        ref = np.asarray(ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else ref)
        got = out[k].permute(1, 2, 0).cpu().numpy()
        assert np.array_equal(got, ref), (k, np.abs(got.astype(int) - ref).max(), (got != ref).mean())
    other = gpu_decode.crop_resize_batch([t for _, t in picks[:2]], torch.tensor(boxes[:2]), torch.tensor(flips[:2]),
                                         size, "bicubic" if interpolation == "bilinear" else "bilinear")
    assert not torch.equal(other, out[:2].cpu())  # the filter is the one asked for


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_padding_is_never_read(interpolation: str) -> None:
    small = torch.full((3, 10, 10), 200, dtype=torch.uint8)
    big = torch.zeros((3, 40, 50), dtype=torch.uint8)  # pads `small` with 30-40 zero rows/columns
    out = gpu_decode.crop_resize_batch([small, big], torch.tensor([[5, 5, 5, 5], [0, 0, 50, 40]]),
                                       torch.tensor([False, True]), (8, 8), interpolation)
    assert torch.equal(out[0], torch.full_like(out[0], 200)) and not out[1].any()


def test_chunks_bound_the_padded_tensor() -> None:
    images = [torch.zeros((3, h, 100), dtype=torch.uint8) for h in (10, 90, 20, 50)]
    groups = gpu_decode._chunks(images, budget=3 * 100 * 50 * 4 * 2)  # room for two 50-row images
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3] and groups[0] == [0, 2] and [1] in groups
    out = gpu_decode.crop_resize_batch(images, torch.tensor([[0, 0, 100, 10]] * 4), torch.zeros(4, dtype=bool), (4, 4))
    assert out.shape == (4, 3, 4, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_one_bad_image_does_not_lose_the_batch(device: str, library: str) -> None:
    good = photo(0)
    blobs = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in (good, b"junk" * 9, good[: len(good) // 3])]
    out = gpu_decode._decode(blobs, torch.device(device))
    assert out[0] is not None and out[0].shape == (3, 375, 500) and out[1] is None
    assert torch.equal(out[0].cpu(), _pixels(good)[1])  # PIL's pixels: the same libjpeg-turbo
    assert torch.equal(out[0].cpu(), gpu_decode._decode(blobs[:1], torch.device(device))[0].cpu())


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[dict, list]:
    """Record the boxes and flips the CPU path crops (by key order) and those the batched crop is given."""
    cpu: dict = {"boxes": [], "filters": set()}  # filters: what both paths resized with
    dev: list = []
    real_pil, real_batch = stream_worker.crop_resize_pil, gpu_decode.crop_resize_batch

    def pil(data, box, size, flip, interpolation):
        cpu["boxes"].append((tuple(box), bool(flip)))
        cpu["filters"].add(interpolation)
        return real_pil(data, box, size, flip, interpolation)

    def batch(images, boxes, flips, size, interpolation):
        cpu["filters"].add(interpolation)
        dev.append((threading.current_thread().name, [(tuple(b), bool(f)) for b, f in
                                                      zip(boxes.tolist(), flips.tolist(), strict=True)]))
        return real_batch(images, boxes, flips, size, interpolation)

    monkeypatch.setattr(stream_worker, "crop_resize_pil", pil)
    monkeypatch.setattr(gpu_decode, "crop_resize_batch", batch)
    return cpu, dev


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("gpu_decode") / "ds", {"train": [13, 5, 9, 17], "val": [7, 10]})


def _loader(source: Path, decode: str, workers: int = 0, split: str = "train", **kw):
    train = split == "train"
    data = DataCfg(path=str(source), workers=workers, decode=decode, interpolation=kw.pop("interpolation", "bilinear"))
    return build_loader(data, split, train=train,
                        dist_env=DistEnv(), image_size=kw.pop("image_size", (24, 32)), micro_batch=4, seed=3,
                        global_batch=8 if train else None, device=kw.pop("device", "cpu"), with_keys=True, **kw)


@pytest.mark.parametrize(("split", "interpolation"), [("train", "bilinear"), ("val", "bilinear"), ("train", "bicubic")])
def test_device_path_crops_the_cpu_paths_boxes_on_the_decode_thread(data: Path, split: str, interpolation: str,
                                                                     library: str, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    cpu, dev = _spy(monkeypatch)
    ref = [(keys, images) for images, _, keys in _loader(data, "cpu", split=split, interpolation=interpolation)]
    got = [(keys, images) for images, _, keys in _loader(data, "gpu", split=split, interpolation=interpolation)]
    assert [k for k, _ in ref] == [k for k, _ in got] and len(got) > 3
    # the same boxes and flips, in the same order: the crop statistics are the CPU path's
    assert [b for _, call in dev for b in call] == cpu["boxes"] and len(cpu["boxes"]) >= 4 * len(got) - 4
    assert {name for name, _ in dev} == {THREAD}  # decoded beside the consumer, not on its thread
    assert cpu["filters"] == {interpolation}
    if split == "train":
        assert any(f for _, call in dev for _, f in call) and not all(f for _, call in dev for _, f in call)
    for (_, x1), (_, x2) in zip(ref, got, strict=True):
        # The same bytes: the decoders' CPU decode_jpeg and PIL's are both libjpeg-turbo (no draft-mode decode at these
        # sizes), the boxes are the same and the batched resize is PIL's (nvJPEG on a GPU decodes a little apart)
        assert torch.equal(x1, x2)


def _encode(img: Image.Image, kind: str) -> tuple[str, bytes]:
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, format="PNG")
        return "png", buf.getvalue()
    if kind == "progressive":
        img.save(buf, format="JPEG", quality=90, progressive=True)
    elif kind == "cmyk":
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
    elif kind == "grey":
        img.convert("L").save(buf, format="JPEG", quality=90)
    elif kind == "rotated":  # stored as is, displayed turned by 90 degrees (EXIF orientation 6)
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, format="JPEG", quality=90, exif=exif)
    else:
        img.save(buf, format="JPEG", quality=90)
    return "jpg", buf.getvalue()


# sample index -> format; others: baseline
KINDS = {3: "png", 6: "progressive", 9: "cmyk", 11: "rotated", 12: "grey", 14: "png"}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One split of 2 shards x 8 samples; some PNG, progressive, CMYK, EXIF-rotated or greyscale JPEG."""
    folder = tmp_path_factory.mktemp("mixed")
    shards = []
    for s in range(2):
        name = f"train-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as tar:
            for i in range(s * 8, s * 8 + 8):
                jpg, label = make_jpeg(i)
                ext, blob = _encode(Image.open(io.BytesIO(jpg)).convert("RGB"), KINDS.get(i, "baseline"))
                tar.write({"__key__": f"train{i:06d}", ext: blob, "cls": str(label).encode()})
        raw = (folder / name).read_bytes()
        shards.append({"name": name, "samples": 8, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
    manifest = {"format": "vitscale-shards/1", "classes": [str(c) for c in range(10)],
                "splits": {"train": {"samples": 16, "shards": shards}}}
    (folder / "dataset.json").write_text(json.dumps(manifest))
    return folder / "dataset.json"


def test_images_nvjpeg_cannot_batch_are_decoded_in_the_workers(mixed: Path, library: str) -> None:
    # rotated: TorchCodec's decoders turn it upright, PIL's decode and the crop boxes do not (the stored pixels)
    kinds = {"baseline": True, "png": False, "progressive": False, "cmyk": False, "grey": False, "rotated": False}
    img = Image.open(io.BytesIO(make_jpeg(0)[0])).convert("RGB")
    assert {k: image_header(_encode(img, k)[1])[2] for k in kinds} == kinds
    ld = _loader(mixed, "gpu", workers=2)
    ld.dataset.set_position(0, 0)
    shipped = list(itertools.islice(iter(ld.dataset), 2))  # the first worker's first two raw batches
    for raw in shipped:
        worker_side = {raw["keys"][i] for i in raw["cpu_index"].tolist()}
        assert worker_side == {k for k in raw["keys"] if int(k[5:]) in KINDS}
        assert all((raw["lengths"][i] > 0) == (k not in worker_side) for i, k in enumerate(raw["keys"]))
        assert raw["images"].shape == (len(worker_side), 3, 24, 32)
    assert sum(len(r["cpu_index"]) for r in shipped) >= 2
    cpu = {k: x for images, _, keys in _loader(mixed, "cpu", workers=2) for k, x in zip(keys, images, strict=True)}
    got = {}
    for images, _, keys in ld:
        got.update(zip(keys, images, strict=True))
    assert got.keys() == cpu.keys() and len(got) == 16 and ld.stats["skipped"] == 0
    for k in got:  # worker-decoded or batched on the device: PIL's resize of the same pixels either way
        assert torch.equal(got[k], cpu[k]), k
    ld.close()


def test_resume_on_the_device_path_is_exact(data: Path) -> None:
    def run(ld, n: int | None = None) -> list[tuple]:
        return [(tuple(keys), crc(images)) for images, _, keys in itertools.islice(ld, n)]

    ref = _loader(data, "gpu", workers=2)
    n = len(ref)
    whole = run(ref) + run(ref)  # two epochs of 10 micro-batches
    assert n == 10 and len(whole) == 2 * n and whole[:n] != whole[n:]
    ref.close()
    for k in (3, n, n + 3):  # inside epoch 0, at its end, inside epoch 1
        first = _loader(data, "gpu", workers=2)
        head = run(first) if k >= n else []
        head += run(first, k - len(head))
        state = first.state_dict()
        first.close()
        second = _loader(data, "gpu", workers=2)
        second.load_state_dict(state)
        rest = run(second)
        rest += run(second) if len(head) + len(rest) < 2 * n else []
        assert head + rest == whole, k
        second.close()
    # rewinding the same loader: batches decoded ahead of the saved position are dropped, not skipped
    same = _loader(data, "gpu", workers=2)
    it = iter(same)
    head = [(tuple(keys), crc(images)) for images, _, keys in itertools.islice(it, 2)]
    state = same.state_dict()
    next(it)
    same.load_state_dict(state)
    assert head + run(same) == whole[:n]
    same.close()


def test_decodes_at_most_two_batches_ahead(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, dev = _spy(monkeypatch)
    ld = _loader(data, "gpu", workers=0)
    it = iter(ld)
    next(it)
    deadline = time.monotonic() + 10
    while len(dev) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert len(dev) == 3  # the batch yielded and the two behind it; no more until the consumer moves
    next(it)
    deadline = time.monotonic() + 10
    while len(dev) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(dev) == 4
    ld.close()


def test_the_decode_thread_ends_with_the_pass_and_the_loader(data: Path) -> None:
    assert not _wait_no_threads()
    ld = _loader(data, "gpu", workers=2)
    old = iter(ld)
    next(old)
    assert len(_decode_threads()) == 1
    fresh = iter(ld)  # a new pass closes the old one, and its thread
    next(fresh)
    assert len(_decode_threads()) == 1 and next(old, None) is None
    ld.close()  # close() ends the pass and its thread
    assert not _decode_threads()
    ld = _loader(data, "gpu", workers=2)
    batches = iter(ld)
    next(batches)
    holder: dict = {"loader": ld, "batches": batches}
    holder["self"] = holder  # only the cycle collector can free it
    del ld, batches, holder
    assert len(_decode_threads()) == 1
    gc.collect()
    assert not _wait_no_threads(), "the decode thread outlived its collected loader"


def test_a_decode_error_reaches_the_consumer_and_ends_the_thread(data: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    def boom(*args, **kwargs):
        raise MemoryError("out of device memory")

    monkeypatch.setattr(gpu_decode, "crop_resize_batch", boom)
    ld = _loader(data, "gpu", workers=0)
    with pytest.raises(MemoryError, match="out of device memory"):
        next(iter(ld))
    assert not _wait_no_threads() and (ld.epoch, ld.position) == (0, 0)
