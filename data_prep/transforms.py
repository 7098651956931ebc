"""Image transforms of the stream: crop boxes, image headers, JPEG draft decoding and normalisation.

Every random choice (crop box, flip) is made in a DataLoader worker from a seeded generator and expressed
as a box in the source image's pixel coordinates. The box is applied either by PIL in the worker
(`decode="cpu"`) or on the device after a batched JPEG decode (`decode="gpu"`, data_prep/gpu_decode.py), so
both paths crop the same region of the same (stored, unrotated) pixels. Batches stay uint8 until `normalize`
runs on the device (4x less traffic than float32).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from data_prep.images import exif_orientation
from data_prep.stream_config import randaugment_spec

if TYPE_CHECKING:  # torchvision is imported where used: its import alone costs a process ~2 s of CPU
    from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = tuple[int, int, int, int]  # (left, top, width, height) in source pixels


def to_hw(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """`224` -> (224, 224); `(h, w)` stays (h, w)."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def random_resized_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Inception-style crop box: the algorithm of torchvision's `RandomResizedCrop.get_params`.

    Drawn from `rng` instead of torch's global generator, so that a worker's crops are a pure function of
    its seed (exact resume) and drawing them never disturbs the trainer's RNG when there are no workers.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # fallback: the largest centre crop within the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: tuple[int, int], crop_pct: float = 0.875) -> Box:
    """Eval box: resize so the image covers `size / crop_pct` (aspect kept), then centre-crop `size`.

    For a square size this is the classic "shorter side to image_size / crop_pct, centre crop".
    """
    th, tw = size
    scale = max(th / crop_pct / height, tw / crop_pct / width)  # source px -> resized px
    w = min(width, max(1, round(tw / scale)))
    h = min(height, max(1, round(th / scale)))
    return (width - w) // 2, (height - h) // 2, w, h


def image_header(data: bytes) -> tuple[int, int, bool]:
    """(width, height, batchable) from the image header alone (no pixel decoding); raises on a non-image.

    batchable: a baseline 3-component (YCbCr) JPEG, the kind nvJPEG's batched decode takes. Progressive,
    CMYK/YCCK and greyscale JPEGs and other formats (PNG, WebP...) are decoded by PIL in the workers on the
    decode="gpu" path: one of them in a batch would make the batched call fail as a whole. So are JPEGs with an
    EXIF rotation: TorchCodec's decoders apply it, the stream's crop boxes and PIL's decode do not (data_prep
    writes upright images; a rotated one comes from shards written by other tools).
    """
    with Image.open(io.BytesIO(data)) as img:
        progressive = bool(img.info.get("progressive") or img.info.get("progression"))
        batchable = img.format == "JPEG" and img.mode == "RGB" and not progressive
        if batchable and "exif" in img.info:  # getexif() parses the APP1 block: only where there is one
            batchable = exif_orientation(img) == 1
        return img.size[0], img.size[1], batchable


RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}  # data.interpolation


def crop_resize_pil(data: bytes, box: Box, size: tuple[int, int], flip: bool,
                    interpolation: str = "bilinear") -> Image.Image:
    """Decode `data`, crop `box`, resize to `size` (h, w) with PIL's antialiased `interpolation` filter, flip;
    returns an RGB PIL image.

    JPEGs are decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 during the inverse DCT when the crop
    is at least that much larger than the output, which skips most of the decoding work.
    """
    th, tw = size
    left, top, w, h = box
    img = Image.open(io.BytesIO(data))
    full_w, full_h = img.size
    if img.format == "JPEG":
        # request the smallest image in which the crop still covers the output size
        img.draft("RGB", (max(1, math.ceil(full_w * tw / w)), max(1, math.ceil(full_h * th / h))))
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    img = img.convert("RGB")
    out = img.resize((tw, th), RESAMPLE[interpolation], box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def pil_to_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 (3, H, W) tensor (no float conversion)."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # np.array: a writable copy of PIL's buffer


def parse_randaugment(spec: str | None) -> v2.RandAugment | None:
    """`"rand-m9-n2"` (timm's notation: magnitude M of 10, N ops) -> torchvision `v2.RandAugment`."""
    if not spec:
        return None
    from torchvision.transforms import v2

    magnitude, num_ops = randaugment_spec(spec)
    # 11 bins so that magnitude m means m/10 of each op's range, as in timm
    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11)


@contextlib.contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """Run a block with torch's CPU generator seeded to `seed`, restoring the caller's state afterwards.

    torchvision's RandAugment draws from that global generator; this makes its choices a pure function of
    the seed without disturbing the trainer's RNG (the CUDA generators are not touched).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    # cached so that a step does not copy two tiny tensors host -> device every time
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255
    inv = 1 / (torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255)
    return m.to(device), inv.to(device)


def normalize(images: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
              dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) or (3, H, W) -> `(x / 255 - mean) / std` as `dtype` on `device` (default: where it is).

    The copy to the device is non-blocking (the loader pins its batches), and the arithmetic runs there.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images from the stream, got {images.dtype}")
    x = images.to(device, non_blocking=True) if device is not None else images
    m, inv = _mean_std(tuple(mean), tuple(std), x.device)
    return ((x.float() - m) * inv).to(dtype)
