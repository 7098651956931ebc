"""Pre-trained weights in, fine-tuning model out (the loading contract; see docs/architecture.md).

Accepted sources: a vitscale weight file (`model.safetensors` with its config in the metadata), a timm
ViT state dict saved as safetensors (config read from the tensor shapes), a Hugging Face transformers ViT
folder or its model.safetensors, a big_vision/AugReg `.npz` (each converted by vit.interop / vit.convert), or
a training run dir (consolidated in-process by the core's export: the two stages never import each other).

Loading for fine-tuning keeps the patch size and every body weight, resamples the position embeddings
from the checkpoint's grid to the new one (class token kept apart), drops the pre-training head (the
tanh pre-logits layer included, as the ViT paper does) and puts on a zero-initialised linear head.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from runtime.config import ConfigError
from vit.config import ViTConfig, vit_config
from vit.interop import Checkpoint, read_any
from vit.model import VisionTransformer
from vit.weights import EvalSettings, WeightFormat, adapt_pos_embed, identify_weights

HEAD_KEYS = {"head.weight", "head.bias"}
DROPPED_PREFIXES = ("head.", "pre_logits.")  # the pre-training head: re-created, never loaded
# What must agree between checkpoint and fine-tuning model for the body weights to mean anything.
ARCH_FIELDS = ("patch_size", "width", "depth", "heads", "mlp_ratio", "in_chans", "qkv_bias", "pool")


def describe_init(path: str | os.PathLike) -> WeightFormat:
    """What an `init=` path holds (vit.weights.identify_weights), plus the one folder fine-tuning accepts."""
    path = Path(path)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return WeightFormat("run-dir", "is a training run dir", "")
    return identify_weights(path)


def read_init(path: str | os.PathLike, heads: int | None = None) -> Checkpoint:
    """The weights of any `init=` source, in vitscale key names, with their config, class names and (where the
    source records them) the eval settings they were trained with: a run dir, or what vit.interop.read_any reads
    (vitscale, timm and transformers files, transformers and timm folders, big_vision .npz).

    Anything else is one ConfigError naming what the file is and how to make it loadable; nothing is
    unpickled (pickled checkpoints are refused from their header bytes, .npz is read with allow_pickle=False).
    """
    path = Path(path)
    if describe_init(path).kind == "run-dir":  # its latest checkpoint, consolidated in-process
        from trainer.export import consolidate

        sd, vcfg, state = consolidate(path)
        settings = EvalSettings.from_dict(state["eval_settings"]) if "eval_settings" in state else None
        return Checkpoint(sd, vcfg, state["class_names"], "run-dir", settings)
    try:
        return read_any(path, heads)
    except ValueError as e:  # the converters' one line: what the file is, then the fix
        raise ConfigError(str(e)) from e


def read_checkpoint(path: str | os.PathLike, heads: int | None = None) -> tuple[dict, ViTConfig, list[str]]:
    """(state dict in vitscale key names, its ViTConfig, class names) of any `init=` source (`read_init`)."""
    ckpt = read_init(path, heads)
    return ckpt.state_dict, ckpt.config, ckpt.class_names


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
        raise ConfigError(f"checkpoint tensor shapes do not fit the model: {'; '.join(bad[:4])}")
    missing, unexpected = model.load_state_dict(body, strict=False)
    if set(missing) != HEAD_KEYS or unexpected:
        raise ConfigError(f"loading contract broken: missing {sorted(set(missing) - HEAD_KEYS) or 'nothing'} "
                         f"besides the head, unexpected {sorted(unexpected) or 'nothing'}; the checkpoint is not "
                         "a complete ViT of this architecture")
    if isinstance(model.head, nn.Linear):  # the new head starts at zero: logits 0, loss log(K) at step 0
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    return model

