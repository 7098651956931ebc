"""Real example images for tests, the demo and the benchmark, from scikit-learn's bundled data (offline).

- `digits`: the 1797 handwritten digits of `load_digits` (8x8, 17 grey levels), upscaled to `size` px
  RGB PNG (or JPEG), in class folders "0".."9".
- `photos`: crops of the two `load_sample_images` photos (china, flower) as JPEGs, in two class folders.

The tree is built in a temporary sibling folder and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

DATASETS = ("digits", "photos")


def _sklearn_file(rel: str) -> Path | None:
    """A data file shipped inside scikit-learn, found without importing it (the import takes seconds)."""
    spec = importlib.util.find_spec("sklearn")
    for base in (spec.submodule_search_locations or []) if spec else []:
        if (Path(base) / "datasets" / rel).is_file():
            return Path(base) / "datasets" / rel
    return None


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) with values 0..16, and targets (1797,)."""
    path = _sklearn_file("data/digits.csv.gz")
    if path is None:  # an unusual install: go through the public loader
        from sklearn.datasets import load_digits as sk_load_digits

        d = sk_load_digits()
        return d.images, d.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (1797, 65): 64 pixels, then the digit
    return data[:, :64].reshape(-1, 8, 8), data[:, 64]


def _digits(root: Path, size: int, per_class: int | None, ext: str) -> None:
    images, targets = load_digits()
    seen: dict[int, int] = {}
    for i, (img, label) in enumerate(zip(images, targets, strict=True)):
        label = int(label)
        if per_class is not None and seen.get(label, 0) >= per_class:
            continue
        seen[label] = seen.get(label, 0) + 1
        grey = Image.fromarray((img * (255 / 16)).round().astype(np.uint8), "L")  # (8, 8), 0..16 -> 0..255
        rgb = grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")  # (size, size, 3)
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        rgb.save(folder / f"{i:04d}.{ext}", **({"quality": 95} if ext == "jpg" else {}))


def sample_photos() -> dict[str, np.ndarray]:
    """scikit-learn's two sample photos (china, flower), name -> (427, 640, 3) uint8."""
    files = [_sklearn_file(f"images/{name}.jpg") for name in ("china", "flower")]
    if None in files:
        from sklearn.datasets import load_sample_images

        data = load_sample_images()
        return {Path(f).stem: img for f, img in zip(data.filenames, data.images, strict=True)}
    return {f.stem: np.asarray(Image.open(f).convert("RGB")) for f in files}


def photo_crops(n: int, size: tuple[int, int] | None = None, seed: int = 0) -> Iterator[tuple[str, Image.Image]]:
    """`n` random crops (name of the photo, RGB image) of the sample photos; resized to `size` if given,
    else at native resolution (at least half the photo's shorter side, landscape or portrait)."""
    photos = sample_photos()
    names = sorted(photos)
    rng = np.random.default_rng(seed)
    for k in range(n):
        name = names[k % len(names)]
        img = photos[name]
        h, w = img.shape[:2]
        aspect = size[0] / size[1] if size else (4 / 3 if rng.random() < 0.7 else 3 / 4)
        ch = int(rng.uniform(0.5, 1.0) * min(h, w / aspect))
        cw = int(ch * aspect)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(img[y:y + ch, x:x + cw])
        yield name, crop.resize(size, Image.Resampling.BICUBIC) if size else crop


def _photos(root: Path, per_class: int | None, seed: int) -> None:
    per_class = per_class or 8
    for name, img in sample_photos().items():  # the whole photo first
        (root / name).mkdir()
        Image.fromarray(img).save(root / name / "000.jpg", quality=90)
    for k, (name, crop) in enumerate(photo_crops(2 * (per_class - 1), seed=seed)):
        crop.save(root / name / f"{k // 2 + 1:03d}.jpg", quality=90)


def write_example_images(out_dir: str | os.PathLike, dataset: str = "digits", size: int = 32,
                         per_class: int | None = None, image_format: str = "png", seed: int = 0) -> Path:
    """Write an ImageFolder tree of real images into `out_dir` (which must not exist or be empty).

    digits: `size` px, `image_format` png|jpg, all 1797 images or `per_class` of each digit.
    photos: `per_class` JPEGs per photo (default 8: the photo and 7 crops of it).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown example dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty: delete it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 is not what a data folder should have
    try:
        if dataset == "digits":
            _digits(tmp, size, per_class, image_format)
        else:
            _photos(tmp, per_class, seed)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _photo_crop(size: tuple[int, int]) -> Image.Image:
    return next(photo_crops(1, size=size, seed=1))[1]


def write_odd_images(root: str | os.PathLike, cls: str = "odd") -> dict[str, str | None]:
    """Images of every awkward kind under `root/cls/` (some nested deeper), for tests and demos.

    Returns {relative path: expected reject reason, or None for an image that must be kept}.
    """
    base = Path(root) / cls
    (base / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    photo = _photo_crop((48, 40))  # real content, (40, 48, 3)
    expect: dict[str, str | None] = {}

    def save(rel: str, img: Image.Image, reason: str | None = None, **kw) -> None:
        img.save(base / rel, **kw)
        expect[f"{cls}/{rel}"] = reason

    save("gray.png", photo.convert("L"))
    save("palette.png", photo.convert("P", palette=Image.Palette.ADAPTIVE), transparency=0)
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    save("rgba.png", rgba)
    save("cmyk.jpg", photo.convert("CMYK"), quality=90)
    save("gray16.png", Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x40, displayed rotated by 90 degrees: 40x48
    save("rotated.jpg", photo, exif=exif, quality=90)
    save("nested/deeper/image.webp", photo, quality=90)
    save("nested/image.bmp", photo)
    save("tiny.png", photo.resize((8, 8)), "too_small")
    (base / "empty.jpg").write_bytes(b"")
    expect[f"{cls}/empty.jpg"] = "empty"
    save("whole.jpg", photo.resize((96, 80)), quality=90)
    data = (base / "whole.jpg").read_bytes()
    (base / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expect[f"{cls}/truncated.jpg"] = "truncated"
    (base / "notes.txt").write_text("not an image\n")
    expect[f"{cls}/notes.txt"] = "not_an_image"
    (base / "zz_copy_of_whole.jpg").write_bytes(data)  # sorts after whole.jpg: the copy is the duplicate
    expect[f"{cls}/zz_copy_of_whole.jpg"] = "duplicate"
    os.symlink(base / "no_such_file.jpg", base / "broken_link.jpg")
    expect[f"{cls}/broken_link.jpg"] = "unreadable"
    return expect
