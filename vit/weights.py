"""Weight files: `model.safetensors` with the config in its metadata, and timm key conversion.

Metadata (DESIGN contract 3): format=vitscale-vit/1, config (ViTConfig JSON), image_size,
class_names (JSON list), step. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vit.config import ViTConfig
from vit.model import VisionTransformer
from vit.pos_embed import resample_pos_embed

FORMAT = "vitscale-vit/1"


def save_weights(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    cfg: ViTConfig,
    class_names: list[str] | None = None,
    step: int | None = None,
) -> Path:
    """Write `state_dict` and its config to a safetensors file, atomically (temp name, then rename)."""
    path = Path(path)
    meta = {
        "format": FORMAT,
        "config": cfg.to_json(),
        "image_size": json.dumps(list(cfg.image_hw)),
        "class_names": json.dumps(list(class_names or [])),
        "step": str(-1 if step is None else int(step)),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata of a weight file: config (ViTConfig), image_size, class_names, step."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a vitscale weight file (format={meta.get('format')!r}, expected {FORMAT!r}); "
            "for a timm state dict use vit.weights.from_timm, for a run dir use `python -m pretrain export`"
        )
    return {
        "config": ViTConfig.from_json(meta["config"]),
        "image_size": tuple(json.loads(meta["image_size"])),
        "class_names": json.loads(meta["class_names"]),
        "step": int(meta["step"]),
    }


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a vitscale weight file: (state dict on CPU, metadata as in `read_metadata`)."""
    meta = read_metadata(path)
    sd: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    return sd, meta


def adapt_pos_embed(sd: dict[str, torch.Tensor], src: ViTConfig, dst: ViTConfig, mode: str = "bicubic") -> dict:
    """Return `sd` with its position embeddings resampled from `src`'s patch grid to `dst`'s."""
    if src.patch_size != dst.patch_size:
        raise ValueError(f"patch size differs ({src.patch_size} vs {dst.patch_size}): cannot reuse patch embedding")
    out = dict(sd)
    out["pos_embed"] = resample_pos_embed(sd["pos_embed"], dst.grid, src.grid, num_prefix_tokens=1, mode=mode)
    return out


def load_model(path: str | os.PathLike, image_size: int | tuple[int, int] | None = None) -> VisionTransformer:
    """Build the model a weight file describes, optionally at another image size (pos-embed resampled)."""
    sd, meta = load_weights(path)
    src = meta["config"]
    dst = src if image_size is None else src.replace(image_size=image_size)
    model = VisionTransformer(dst)
    model.load_state_dict(adapt_pos_embed(sd, src, dst), strict=True)
    return model


# Our key <-> timm key. Everything else (cls_token, pos_embed, blocks.*, norm, head) has the same name.
_TO_TIMM = [
    (r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^pre_logits\.fc\.(weight|bias)$", r"head.pre_logits.fc.\1"),
]
_FROM_TIMM = [
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.\1"),
    (r"^head\.pre_logits\.fc\.(weight|bias)$", r"pre_logits.fc.\1"),
    (r"^pre_logits\.fc\.(weight|bias)$", r"pre_logits.fc.\1"),
]
# timm parts our ViT does not have; refused, never silently dropped. (timm's mean pooling puts a
# LayerNorm after the pooling, `fc_norm`; ours normalises before it, as big_vision does: create the timm
# model with `fc_norm=False` to match.)
_TIMM_UNSUPPORTED = re.compile(r"\.ls[12]\.|^reg_token|\.(q|k)_norm\.|^attn_pool|^fc_norm\.|^norm_pre\.")


def _rename(sd: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    return out


def to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> timm `VisionTransformer` key names."""
    return _rename(sd, _TO_TIMM)


def from_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `VisionTransformer` state dict -> our key names.

    Refuses layer-scale, register tokens and other parts our model does not have, rather than
    silently dropping them.
    """
    unsupported = [k for k in sd if _TIMM_UNSUPPORTED.search(k)]
    if unsupported:
        raise ValueError(f"timm weights use parts vitscale's ViT does not have: {unsupported[:4]}")
    return _rename(sd, _FROM_TIMM)
