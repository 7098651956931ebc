"""One source image -> the bytes stored in a shard.

`encode_image` checks, orients, converts and resizes one image and returns what goes into the tar, or
raises `Reject(reason)`. It is the only place that decides what an image becomes, and it runs in the
writer's worker processes, never in the parent.

- `keep` passes the source bytes through untouched when nothing needs to change (JPEG/PNG/WebP, already
  RGB, upright, no resize); the image is still decoded (JPEG at 1/8 scale) so truncated files are caught.
- Shrinking a JPEG decodes it with libjpeg's DCT scaling (`draft`) at the smallest power-of-two scale that
  is still at least the target size, then resamples the rest of the way: less to decode, less to resize.
- EXIF orientation is applied; grayscale, palette, alpha (over white), CMYK and 16-bit images become RGB.
- Never upscales.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("keep", "jpeg", "webp")
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
RESAMPLE = Image.Resampling.BICUBIC  # antialiased when shrinking
EXIF_ORIENTATION = 0x0112
SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class Reject(Exception):
    """An input that is skipped and logged to `rejects.jsonl`, never fatal."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


MIN_SIZE = 16  # default shorter-side minimum: the writer rejects smaller images, the stream skips them


@dataclass(frozen=True)
class ImageOptions:
    """What the writer does to every image."""

    resize_shorter: int | None = None  # shorter side to this many pixels (never upscale)
    resize_longer: int | None = None  # longer side to at most this many pixels
    format: str = "keep"  # keep | jpeg | webp
    quality: int = 90  # JPEG / WebP quality when re-encoding
    min_size: int = MIN_SIZE  # shorter side below this: rejected as too_small

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in 1..100, got {self.quality}")
        for name in ("resize_shorter", "resize_longer"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive pixel count, got {v}")
        if self.min_size < 1:
            raise ValueError(f"--min-size must be >= 1, got {self.min_size}")


@dataclass(frozen=True)
class Encoded:
    data: bytes
    ext: str  # tar member extension: jpg | png | webp
    width: int
    height: int
    phash: int | None = None  # near.phash_image of the decoded image, when asked for


def target_scale(w: int, h: int, opts: ImageOptions) -> float:
    """The factor (<= 1) that meets both resize limits; 1 when no resize is asked for or needed."""
    scale = 1.0
    if opts.resize_shorter:
        scale = min(scale, opts.resize_shorter / min(w, h))
    if opts.resize_longer:
        scale = min(scale, opts.resize_longer / max(w, h))
    return scale


def scaled_size(w: int, h: int, scale: float) -> tuple[int, int]:
    return max(1, round(w * scale)), max(1, round(h * scale))


def output_format(src_format: str | None, opts: ImageOptions) -> str:
    """PIL format name written: `keep` keeps JPEG/PNG/WebP and turns anything else into JPEG."""
    if opts.format == "keep":
        return src_format if src_format in EXT else "JPEG"
    return opts.format.upper()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16-bit scaled to 8-bit, transparency composited over white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # 16-bit (I;16*) or 32-bit int grayscale: scale, don't clip
        arr = np.asarray(img).astype(np.int64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) >> 8
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 (upright) without one or with a broken EXIF block."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # a broken EXIF block is not worth rejecting an image for
        return 1


def _decode(img: Image.Image) -> None:
    """Decode the pixel data; map PIL's errors to reject reasons."""
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise Reject("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        raise Reject("truncated" if "truncated" in msg or isinstance(e, EOFError) else "corrupt", msg) from None


def _open(data: bytes) -> Image.Image:
    if not data:
        raise Reject("empty", "zero bytes")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise Reject("not_an_image", "no image format recognised") from None
    except Image.DecompressionBombError as e:
        raise Reject("too_large", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Reject("corrupt", str(e)) from None


def _save(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, "PNG")
    else:
        img.save(buf, fmt, quality=quality)
    return buf.getvalue()


def _phash(img: Image.Image, want: bool) -> int | None:
    if not want:
        return None
    from data_prep.near import phash_image

    return phash_image(img)


def encode_image(data: bytes, opts: ImageOptions, want_hash: bool = False) -> Encoded:
    """Check and transform one image's bytes into what the shard stores; raise `Reject` if unusable.

    `want_hash`: also the perceptual hash, from the image decoded here anyway (no second decode)."""
    img = _open(data)
    w, h = img.size  # as stored, before EXIF rotation
    if min(w, h) < opts.min_size:
        raise Reject("too_small", f"{w}x{h} is under --min-size {opts.min_size}")
    scale = target_scale(w, h, opts)
    orientation = exif_orientation(img)
    fmt = output_format(img.format, opts)
    if opts.format == "keep" and scale == 1.0 and fmt == img.format and img.mode == "RGB" and orientation == 1:
        if img.format == "JPEG":  # full entropy decode, cheap IDCT (>= 32 px when hashing, as near.phash_bytes)
            side = 32 if want_hash else 1
            img.draft("RGB", (min(w, max(side, w // 8)), min(h, max(side, h // 8))))
        _decode(img)
        return Encoded(data, EXT[fmt], w, h, _phash(img, want_hash))
    out_w, out_h = scaled_size(w, h, scale)
    if scale < 1.0 and img.format == "JPEG":
        img.draft(img.mode, (out_w, out_h))  # decode at >= the target size
    _decode(img)
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
        if orientation in SWAPS_AXES:
            out_w, out_h = out_h, out_w
    img = to_rgb(img)
    if img.size != (out_w, out_h):
        img = img.resize((out_w, out_h), RESAMPLE)
    return Encoded(_save(img, fmt, opts.quality), EXT[fmt], out_w, out_h, _phash(img, want_hash))
