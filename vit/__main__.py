"""`python -m vit info|inspect`: parameters and FLOPs of the ViT variants; figures of what a model learned.

    python -m vit info [VARIANT ...] [--image-size S]
    python -m vit inspect WEIGHTS_OR_RUN_DIR [--images DIR_OR_SHARDS] [--out DIR]     (see vit/inspect.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from runtime.argtypes import count, index
from vit.config import variant_names, vit_config
from vit.flops import inference_flops_per_image, train_flops_per_image
from vit.model import VisionTransformer
from vit.weights import EvalSettings


def info(variants: list[str], image_size: int, num_classes: int) -> str:
    """A table of parameter count and per-image GFLOPs for each variant."""
    rows = [f"{'variant':<8} {'px':>5} {'tokens':>7} {'params':>9} {'fwd GFLOP':>10} {'train GFLOP':>12}"]
    for name in variants:
        cfg = vit_config(name, image_size=image_size, num_classes=num_classes)
        with torch.device("meta"):  # shapes only: no memory, instant even for H/14
            params = sum(p.numel() for p in VisionTransformer(cfg).parameters())
        rows.append(
            f"{name:<8} {image_size:>5} {cfg.num_patches + 1:>7} {params / 1e6:>8.1f}M "
            f"{inference_flops_per_image(cfg) / 1e9:>10.1f} {train_flops_per_image(cfg) / 1e9:>12.1f}"
        )
    return "\n".join(rows)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _folder_images(folder: Path, hw: tuple[int, int], settings: EvalSettings, n: int) -> torch.Tensor:
    """The first n readable images of a folder (sorted, recursive), as the eval stream prepares them (the
    weights' crop_pct and resize filter); uint8. A file that does not decode is skipped, and named on stderr."""
    from PIL import Image, UnidentifiedImageError

    from data_prep.transforms import center_crop_box, crop_resize_pil, image_header, pil_to_chw

    out, skipped = [], []
    for f in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        if len(out) == n:
            break
        try:
            data = f.read_bytes()
            width, height, _ = image_header(data)
            box = center_crop_box(width, height, hw, settings.crop_pct)
            out.append(pil_to_chw(crop_resize_pil(data, box, hw, False, settings.interpolation)))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):  # truncated, not an image
            skipped.append(str(f))
    if skipped:
        print(f"note: skipped {len(skipped)} file(s) that are not readable images: {', '.join(skipped[:3])}"
              f"{', ...' if len(skipped) > 3 else ''}", file=sys.stderr)
    return torch.stack(out) if out else torch.zeros(0, 3, *hw, dtype=torch.uint8)


def _shard_images(path: Path, hw: tuple[int, int], settings: EvalSettings, n: int) -> torch.Tensor:
    """The first n images of a dataset's val split (else its first split), as the eval stream prepares them."""
    import json

    from data_prep.stream import DataCfg, build_loader
    from runtime.dist import DistEnv

    manifest = path / "dataset.json" if path.is_dir() else path
    splits = list(json.loads(manifest.read_text())["splits"])
    split = "val" if "val" in splits else splits[0]
    data = DataCfg(path=str(manifest), workers=0, crop_pct=settings.crop_pct, interpolation=settings.interpolation)
    loader = build_loader(data, split, train=False,
                          dist_env=DistEnv(), image_size=hw, micro_batch=n, seed=0, device="cpu")
    try:
        images, labels = next(iter(loader))
    finally:
        loader.close()
    return images[labels >= 0]


def inspect_verb(weights: str, images: str | None, out: str, n: int = 8) -> list[Path]:
    """`inspect`: the figures and numbers of a weight file (any format vit.interop reads) or a run dir into `out`."""
    from runtime.config import ConfigError
    from runtime.io import output_problem
    from trainer.export import read_weights
    from vit.inspect import inspect_model, write_inspection

    if why := output_problem(out, "--out", folder=True):
        raise ConfigError(why)
    sd, cfg, settings = read_weights(weights, "inspect")
    model = VisionTransformer(cfg)
    missing = [k for k in model.load_state_dict(sd, strict=False).missing_keys if "head" not in k]
    if missing:
        raise ConfigError(f"{weights} lacks {', '.join(missing[:3])}; pass a whole ViT's weights")
    batch = None
    if images:
        src = Path(images)
        if not src.exists():
            raise ConfigError(f"--images {images} does not exist; pass a folder of images or a dataset.json")
        shards = src.suffix == ".json" or (src / "dataset.json").is_file()
        read = _shard_images if shards else _folder_images
        batch = read(src, model.cfg.image_hw, settings, n)
        if not len(batch):
            raise ConfigError(f"--images {images} holds no readable image (.jpg, .png, .webp) or labelled sample")
    numbers, figures = inspect_model(model, batch, (settings.mean, settings.std))
    return write_inspection(out, numbers, figures)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vit", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    i = sub.add_parser("info", help="parameters and FLOPs per image")
    i.add_argument("variants", nargs="*", default=[v for v in variant_names() if v != "debug"])
    i.add_argument("--image-size", type=count, default=224)
    i.add_argument("--num-classes", type=index, default=1000, help="0: no head")
    s = sub.add_parser("inspect", help="figures of a weight file: embedding filters, pos-embed similarity, "
                       "attention distance and rollout (PNG + inspect.json)")
    s.add_argument("weights", help="a weight file (vitscale, timm, transformers, .npz) or a run dir (its latest "
                   "checkpoint)")
    s.add_argument("--images", default=None, help="a folder of images or a dataset.json (the attention figures "
                   "need images; without, only the filters and position embeddings are drawn)")
    s.add_argument("--out", default="inspect", help="output folder (default ./inspect)")
    s.add_argument("--n", type=count, default=8, help="images used (at most 8 are drawn)")
    args = p.parse_args(argv)
    if args.verb == "info":
        try:
            print(info(args.variants, args.image_size, args.num_classes))
        except ValueError as err:  # an unknown variant, or a size the patches do not tile: one usage line, exit 2
            i.error(str(err))
        return 0
    from trainer.cli import run_verb

    return run_verb(lambda: print("\n".join(str(f) for f in inspect_verb(args.weights, args.images, args.out,
                                                                          args.n))))


if __name__ == "__main__":
    raise SystemExit(main())
