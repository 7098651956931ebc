"""`python -m vit info [VARIANT ...] [--image-size S]`: parameters and FLOPs of the ViT variants."""

from __future__ import annotations

import argparse

import torch

from vit.config import variant_names, vit_config
from vit.flops import inference_flops_per_image, train_flops_per_image
from vit.model import VisionTransformer


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vit", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)
    i = sub.add_parser("info", help="parameters and FLOPs per image")
    i.add_argument("variants", nargs="*", default=[v for v in variant_names() if v != "debug"])
    i.add_argument("--image-size", type=int, default=224)
    i.add_argument("--num-classes", type=int, default=1000)
    args = p.parse_args(argv)
    print(info(args.variants, args.image_size, args.num_classes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
