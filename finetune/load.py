"""Pre-trained weights in, fine-tuning model out (the loading contract; see docs/architecture.md).

Accepted sources: a vitscale weight file (`model.safetensors` with its config in the metadata), a timm
ViT state dict saved as safetensors (config read from the tensor shapes), or a training run dir
(consolidated in-process by the core's export: the two stages never import each other).

Loading for fine-tuning keeps the patch size and every body weight, resamples the position embeddings
from the checkpoint's grid to the new one (class token kept apart), drops the pre-training head (the
tanh pre-logits layer included, as the ViT paper does) and puts on a zero-initialised linear head.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from runtime.config import ConfigError
from vit.config import ViTConfig, variant_names, vit_config
from vit.model import VisionTransformer
from vit.weights import WeightFormat, adapt_pos_embed, from_timm, identify_weights, load_weights

HEAD_KEYS = {"head.weight", "head.bias"}
DROPPED_PREFIXES = ("head.", "pre_logits.")  # the pre-training head: re-created, never loaded
# What must agree between checkpoint and fine-tuning model for the body weights to mean anything.
ARCH_FIELDS = ("patch_size", "width", "depth", "heads", "mlp_ratio", "in_chans", "qkv_bias", "pool")


def _infer_timm_config(sd: dict[str, torch.Tensor], heads: int | None) -> ViTConfig:
    """A ViTConfig from the shapes of a (renamed) timm ViT state dict; heads come from `heads` or the variant."""
    width, in_chans, patch, _ = sd["patch_embed.weight"].shape  # present: checked by describe_state_dict
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    side = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    if heads is None:  # attention heads leave no trace in the shapes: take them from the matching paper variant
        match = [v for v in variant_names() if (c := vit_config(v)).width == width and c.depth == depth]
        if not match:
            raise ConfigError(f"timm checkpoint has width {width}, depth {depth}: no known variant; set "
                              "model.variant so the number of attention heads is known")
        heads = vit_config(match[0]).heads
    rep = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    try:
        return ViTConfig(image_size=side * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                         heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
                         num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                         representation_size=rep, qkv_bias="blocks.0.attn.qkv.bias" in sd)
    except (KeyError, ValueError) as e:  # e.g. no blocks.0.mlp.fc1, or width not divisible by heads
        raise ConfigError(f"timm ViT state dict does not fit vitscale's ViT ({e}); pass a plain timm ViT "
                          "or set model.variant to its architecture") from e


def describe_init(path: str | os.PathLike) -> WeightFormat:
    """What an `init=` path holds (vit.weights.identify_weights), plus the one folder fine-tuning accepts."""
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return WeightFormat("run-dir", "is a training run dir", "")
    return identify_weights(path)


def read_checkpoint(path: str | os.PathLike, heads: int | None = None) -> tuple[dict, ViTConfig, list[str]]:
    """(state dict in vitscale key names, its ViTConfig, class names) of a vitscale or timm safetensors file.

    Anything else is one ConfigError naming what the file is and how to make it loadable; nothing is
    unpickled (pickled checkpoints are refused from their header bytes).
    """
    path = Path(path)
    fmt = describe_init(path)
    if fmt.kind == "run-dir":  # its latest checkpoint, consolidated in-process
        from trainer.export import consolidate

        sd, vcfg, state = consolidate(path)
        return sd, vcfg, state["class_names"]
    if not fmt.loadable:
        raise ConfigError(fmt.message(path))
    try:
        if fmt.kind == "vitscale":
            sd, meta = load_weights(path)
            return sd, meta["config"], meta["class_names"]
        with safe_open(str(path), framework="pt") as f:
            sd = from_timm({k: f.get_tensor(k) for k in f.keys()})
            meta = f.metadata() or {}
        if "vitscale_config" in meta:  # timm key names written by `pretrain export --timm`: the config came along
            return sd, ViTConfig.from_json(meta["vitscale_config"]), []
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as e:  # bad metadata JSON, a short file, ...
        raise ConfigError(f"{path} {fmt.found} but cannot be read ({' '.join(str(e).split())[:160]}); "
                          "re-export or re-download it") from e
    return sd, _infer_timm_config(sd, heads), []


def finetune_config(src: ViTConfig, *, image_size: int | tuple[int, int], num_classes: int, variant: str = "",
                    dropout: float = 0.0, drop_path: float = 0.0) -> ViTConfig:
    """The fine-tuning model: the checkpoint's architecture at `image_size`, one linear head of `num_classes`."""
    if variant:
        want = vit_config(variant)
        diff = [f"{k}: checkpoint {getattr(src, k)} vs {variant} {getattr(want, k)}" for k in ARCH_FIELDS
                if k not in ("in_chans", "qkv_bias", "pool") and getattr(src, k) != getattr(want, k)]
        if diff:
            raise ConfigError(f"the checkpoint is not a {variant} model ({'; '.join(diff)}); "
                             "use a matching checkpoint or set model.variant to its architecture (or '')")
    return src.replace(image_size=image_size, num_classes=num_classes, representation_size=None,
                       dropout=dropout, attn_dropout=0.0, drop_path=drop_path)


def check_compatible(src: ViTConfig, dst: ViTConfig) -> None:
    """Raise a clear error when the checkpoint's body cannot be loaded into `dst` (patch size, width, ...)."""
    diff = [f"{k} {getattr(src, k)} (checkpoint) vs {getattr(dst, k)} (model)" for k in ARCH_FIELDS
            if getattr(src, k) != getattr(dst, k)]
    if diff:
        hint = " (the patch embedding only fits its own patch size)" if src.patch_size != dst.patch_size else ""
        raise ConfigError(f"checkpoint does not fit the fine-tuning model: {'; '.join(diff)}{hint}; "
                         "fine-tune at a new image size, not a new architecture")


def build_finetune_model(sd: dict[str, torch.Tensor], src: ViTConfig, dst: ViTConfig,
                         mode: str = "bicubic") -> VisionTransformer:
    """Load `sd` (config `src`) into a fresh `dst` model: pos-embed resampled, new zero-init head.

    The contract is asserted: exactly the head is missing afterwards, and nothing is left unused
    except the dropped pre-training head.
    """
    check_compatible(src, dst)
    if dst.representation_size is not None:
        raise ValueError("a fine-tuning model has one linear head: build it with representation_size=None")
    body = {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}
    body = adapt_pos_embed(body, src, dst, mode=mode)
    model = VisionTransformer(dst)
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in body.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"checkpoint tensor shapes do not fit the model: {'; '.join(bad[:4])}")
    missing, unexpected = model.load_state_dict(body, strict=False)
    if set(missing) != HEAD_KEYS or unexpected:
        raise ValueError(f"loading contract broken: missing {sorted(set(missing) - HEAD_KEYS) or 'nothing'} "
                         f"besides the head, unexpected {sorted(unexpected) or 'nothing'}; the checkpoint is not "
                         "a complete ViT of this architecture")
    if isinstance(model.head, nn.Linear):  # the new head starts at zero: logits 0, loss log(K) at step 0
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model

