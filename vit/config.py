"""ViT configuration and the named variants of the ViT paper (Dosovitskiy et al., 2021, table 1)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass
class ViTConfig:
    """Everything that fixes a ViT's shapes and regularisation.

    `image_size` may be an int (square) or (height, width); both must be multiples of `patch_size`.
    `representation_size` set = the paper's pre-training head (Linear -> tanh -> Linear);
    None = one linear head, as used for fine-tuning.
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    representation_size: int | None = None
    pool: str = "token"  # "token" (class token) or "mean" (mean of patch tokens)
    qkv_bias: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.image_size, list):
            self.image_size = tuple(self.image_size)
        h, w = self.image_hw
        if h < 1 or w < 1:
            raise ValueError(f"image size {h}x{w} must be positive (a multiple of patch size {self.patch_size})")
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of patch size {self.patch_size}; "
                f"pick a size divisible by {self.patch_size} (e.g. {h // self.patch_size * self.patch_size})"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.pool not in ("token", "mean"):
            raise ValueError(f"pool must be 'token' or 'mean', got {self.pool!r}")

    @property
    def image_hw(self) -> tuple[int, int]:
        s = self.image_size
        return (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        h, w = self.image_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid
        return gh * gw

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    def replace(self, **changes) -> ViTConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ViTConfig:
        return cls(**json.loads(text))


# name -> (patch, width, depth, heads, mlp_ratio); sizes from the ViT paper (Ti/S from DeiT).
_VARIANTS: dict[str, tuple[int, int, int, int, float]] = {
    "Ti/16": (16, 192, 12, 3, 4.0),
    "S/16": (16, 384, 12, 6, 4.0),
    "B/16": (16, 768, 12, 12, 4.0),
    "B/32": (32, 768, 12, 12, 4.0),
    "L/16": (16, 1024, 24, 16, 4.0),
    "L/32": (32, 1024, 24, 16, 4.0),
    "H/14": (14, 1280, 32, 16, 4.0),
    # Tiny model for CPU tests: real code path, runs in milliseconds.
    "debug": (8, 32, 2, 2, 2.0),
}


def variant_names() -> list[str]:
    """Names accepted by `vit_config`."""
    return list(_VARIANTS)


def vit_config(variant: str, **overrides) -> ViTConfig:
    """Config for a named variant (`"L/16"`, `"vit_l16"` and `"l16"` all work), with field overrides."""
    key = _normalise_variant(variant)
    patch, width, depth, heads, mlp_ratio = _VARIANTS[key]
    fields = dict(patch_size=patch, width=width, depth=depth, heads=heads, mlp_ratio=mlp_ratio)
    if key == "debug":
        fields.update(image_size=32, num_classes=10)
    fields.update(overrides)
    return ViTConfig(**fields)


def _normalise_variant(variant: str) -> str:
    if variant in _VARIANTS:
        return variant
    v = variant.lower().removeprefix("vit_").removeprefix("vit-").replace("/", "")
    for name in _VARIANTS:
        if name.lower().replace("/", "") == v:
            return name
    import difflib

    close = difflib.get_close_matches(variant, list(_VARIANTS), n=3, cutoff=0.3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown ViT variant {variant!r}{hint} (known: {', '.join(_VARIANTS)})")
