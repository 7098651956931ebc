"""Weight files of every supported format in, and the ecosystem's formats out (the conversions: vit.convert).

`read_any(path)` reads what `vit.weights.identify_weights` calls loadable: a vitscale weight file, a timm ViT
safetensors file, a transformers ViT folder (config.json + model.safetensors, sharded too) or its
`model.safetensors` alone, a timm model folder (config.json + model.safetensors, the Hub's layout), and a
big_vision/AugReg `.npz` (numpy, `allow_pickle=False`). Everything comes
back in vitscale's key names with a ViTConfig. Anything else raises ValueError with one line: what the file
is, then the fix. `save_hf` and `save_npz` write the other direction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.io import atomic_path, atomic_write
from vit import convert
from vit.config import ViTConfig, vit_config
from vit.weights import EvalSettings, identify_weights, load_weights, save_weights

HF_WEIGHTS, HF_INDEX, HF_CONFIG = "model.safetensors", "model.safetensors.index.json", "config.json"
HF_PROCESSOR = "preprocessor_config.json"  # what transformers' AutoImageProcessor and pipeline() read
_TIMM_SIZES = {"tiny": "Ti/16", "small": "S/16", "base": "B/16", "large": "L/16", "huge": "H/14"}  # timm's names
_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL's filter codes, as transformers stores `resample`


@dataclass
class Checkpoint:
    """Weights read from any supported format, in vitscale's key names."""

    state_dict: dict[str, torch.Tensor]
    config: ViTConfig
    class_names: list[str]
    kind: str  # the vit.weights.WeightFormat kind it was read as
    eval_settings: EvalSettings | None = None  # only vitscale-written files know how they were evaluated


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _ours_meta(meta: dict[str, str]) -> tuple[ViTConfig | None, list[str], EvalSettings | None]:
    """The vitscale config, class names and eval settings that `export --format timm|hf` leave in a foreign file."""
    cfg = ViTConfig.from_json(meta["vitscale_config"]) if "vitscale_config" in meta else None
    names = json.loads(meta.get("class_names", "[]"))
    ev = EvalSettings.from_json(meta["eval"]) if "eval" in meta else None
    return cfg, names, ev


def _hf_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, str]]:
    """(tensors, config.json, metadata of the first shard) of a transformers model folder."""
    conf = json.loads((path / HF_CONFIG).read_text())
    if (path / HF_WEIGHTS).is_file():
        sd, meta = _tensors(path / HF_WEIGHTS)
        return sd, conf, meta
    shards = sorted(set(json.loads((path / HF_INDEX).read_text())["weight_map"].values()))
    sd, meta = {}, {}
    for name in shards:
        part, m = _tensors(path / name)
        sd.update(part)
        meta = meta or m
    return sd, conf, meta


def read_any(path: str | os.PathLike, heads: int | None = None) -> Checkpoint:
    """Read a loadable weight file or folder (see the module doc); `heads` helps a timm or bare HF file whose
    config is not stored with it (else the paper variant of its width and depth decides)."""
    path = Path(path)
    fmt = identify_weights(path)
    if not fmt.loadable:
        raise ValueError(fmt.message(path))
    try:
        if fmt.kind == "vitscale":
            sd, meta = load_weights(path)
            return Checkpoint(sd, meta["config"], meta["class_names"], fmt.kind, meta["eval"])
        if fmt.kind == "bv-npz":
            with np.load(path, allow_pickle=False) as z:  # never pickle: object arrays raise
                sd, cfg = convert.from_big_vision({k: z[k] for k in z.files})
            return Checkpoint(sd, cfg, [], fmt.kind, big_vision_eval_settings(cfg))
        if fmt.kind == "hf-folder":
            raw, conf, meta = _hf_folder(path)
            sd = convert.from_hf(raw)
            labels = conf.get("id2label") or {}
            names = [labels.get(str(i), str(i)) for i in range(len(labels))]
            cfg = convert.config_from_hf(conf, sd)
            return Checkpoint(sd, cfg, _ours_meta(meta)[1] or names, fmt.kind,
                              _ours_meta(meta)[2] or hf_eval_settings(path / HF_PROCESSOR, cfg))
        if fmt.kind == "timm-folder":
            return _timm_folder(path, heads)
        raw, meta = _tensors(path)
        sd = convert.from_hf(raw) if fmt.kind == "hf-vit" else convert.from_timm(raw)
        cfg, names, ev = _ours_meta(meta)
        return Checkpoint(sd, cfg or convert.config_from_shapes(sd, heads), names, fmt.kind, ev)
    except convert.ConversionError as e:  # readable, but not a ViT vitscale can hold
        raise ValueError(f"{path} {fmt.found}, but {e}") from e
    except (ValueError, KeyError, TypeError, OSError) as e:  # a short file, bad JSON, a missing tensor, ...
        why = " ".join(str(e).split())[:200]
        raise ValueError(f"{path} {fmt.found} but cannot be read ({why}); re-export or re-download it") from e


def _timm_folder(path: Path, heads: int | None) -> Checkpoint:
    """A timm model folder: its model.safetensors (ours or timm's), the class names and eval transform of its
    config.json's `pretrained_cfg` where the weights carry none."""
    conf = json.loads((path / HF_CONFIG).read_text())
    pre, args = conf.get("pretrained_cfg") or {}, conf.get("model_args") or {}
    size = re.match(r"vit_(tiny|small|base|large|huge)_patch", str(conf.get("architecture")))
    if not (heads or args.get("num_heads")) and size and "embed_dim" not in args:  # the architecture's own heads
        heads = vit_config(_TIMM_SIZES[size[1]]).heads
    ckpt = read_any(path / HF_WEIGHTS, heads or args.get("num_heads"))
    hw = args.get("img_size") or (pre.get("input_size") or [0])[1:]  # the shapes alone only tell a square grid
    hw = (hw, hw) if isinstance(hw, int) else tuple(hw) if isinstance(hw, list) and len(hw) == 2 else None
    if hw and ckpt.kind != "vitscale":  # (our own file's config is exact)
        with contextlib.suppress(ValueError, TypeError):  # a size the patch does not divide: the shapes' guess stays
            cfg = ckpt.config.replace(image_size=hw)
            if cfg.num_patches + 1 == ckpt.state_dict["pos_embed"].shape[1]:
                ckpt = dataclasses.replace(ckpt, config=cfg)
    names = list(conf.get("label_names") or pre.get("label_names") or [])
    names = ckpt.class_names or (names if len(names) == ckpt.config.num_classes else [])
    try:  # timm's data config: crop_pct and interpolation have timm's defaults; no mean/std, no settings
        settings = ckpt.eval_settings or EvalSettings(
            image_size=ckpt.config.image_hw, crop_pct=float(pre.get("crop_pct") or 0.875), mean=pre["mean"],
            std=pre["std"], interpolation="bilinear" if pre.get("interpolation") == "bilinear" else "bicubic")
    except (KeyError, ValueError, TypeError):
        settings = None
    return dataclasses.replace(ckpt, class_names=names, kind="timm-folder", eval_settings=settings)


def big_vision_eval_settings(cfg: ViTConfig) -> EvalSettings:
    """How big_vision (and the ViT paper's JAX code) feed their ViTs: pixels scaled to [-1, 1] (`value_range(-1,
    1)`: mean = std = 0.5), resized bilinear; the centre crop of its ImageNet evals (`resize_small(256) |
    central_crop(224)`, 0.875)."""
    return EvalSettings(image_size=cfg.image_hw, crop_pct=0.875, interpolation="bilinear", mean=(0.5,) * 3,
                        std=(0.5,) * 3)


def timm_blocker(cfg: ViTConfig) -> str | None:
    """Why timm's ViT cannot load `cfg`'s weights strictly (None if it can)."""
    if cfg.representation_size:
        return (f"has the paper's tanh pre-logits layer (representation_size={cfg.representation_size}), which "
                "timm's ViT has not; fine-tune it first (python -m finetune train ... init=FILE) or export "
                "--format vitscale (head.pre_logits.fc.* is then the one key timm does not know)")
    return None


def hf_blocker(cfg: ViTConfig) -> str | None:
    """Why transformers' `ViTForImageClassification` cannot hold `cfg`'s weights (None if it can)."""
    if cfg.representation_size:
        return timm_blocker(cfg).replace("timm's ViT", "ViTForImageClassification")
    if cfg.pool != "token":
        return "is a mean-pool model; ViTForImageClassification classifies the class token: export --format timm"
    if cfg.num_classes <= 0:
        return "has no classification head; ViTForImageClassification needs one"
    return None


def hf_processor_config(settings: EvalSettings) -> dict:
    """transformers' `preprocessor_config.json` repeating our eval transform: resize to image_size / crop_pct (the
    shorter side, aspect kept; for a non-square size both sides, to that shape), centre crop image_size, scale to
    [0, 1], normalise. BitImageProcessor is transformers' processor with these steps in this order
    (ViTImageProcessor resizes straight to the final size and crops nothing)."""
    (h, w), c = settings.image_size, settings.crop_pct
    size = {"shortest_edge": round(h / c)} if h == w else {"height": round(h / c), "width": round(w / c)}
    return {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True, "size": size,
            "resample": _RESAMPLE[settings.interpolation], "do_center_crop": True,
            "crop_size": {"height": h, "width": w}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(settings.mean), "image_std": list(settings.std)}


def _side(size: object) -> int | None:
    """The side a transformers `size`/`crop_size` entry resizes to: an int (older files), shortest_edge or height."""
    if isinstance(size, dict):
        size = size.get("shortest_edge") or size.get("height")
    return size if isinstance(size, int) and size > 0 else None


def hf_eval_settings(path: Path, cfg: ViTConfig) -> EvalSettings | None:
    """The eval settings a transformers `preprocessor_config.json` describes, at the model's own size: its
    normalisation, its crop fraction (crop size / resize size), its filter. None without the file, or where it
    names no mean and std (our defaults then apply)."""
    try:
        conf = json.loads(path.read_text())
        mean, std = conf["image_mean"], conf["image_std"]
    except (OSError, ValueError, KeyError, TypeError):  # no file, not JSON, no normalisation given
        return None
    resized, crop = _side(conf.get("size")), _side(conf.get("crop_size")) if conf.get("do_center_crop") else None
    crop_pct = min(1.0, crop / resized) if crop and resized else 1.0
    try:
        return EvalSettings(image_size=cfg.image_hw, crop_pct=crop_pct, mean=mean, std=std,
                            interpolation="bicubic" if conf.get("resample") == 3 else "bilinear")
    except (ValueError, TypeError):  # e.g. a mean with the wrong number of channels: our defaults
        return None


def save_hf(out_dir: str | os.PathLike, sd: dict[str, torch.Tensor], cfg: ViTConfig,
            class_names: list[str] | None = None, eval_settings: EvalSettings | None = None) -> Path:
    """Write a transformers `ViTForImageClassification` folder: config.json + model.safetensors +
    preprocessor_config.json (the eval transform of `eval_settings`, else our defaults at the model's size), so
    `pipeline("image-classification", model=out_dir)` and AutoImageProcessor work.

    The safetensors metadata keeps `format=pt` (transformers requires it) and our config, class names and
    eval settings, so `read_any` of the folder gets them back.
    """
    if why := hf_blocker(cfg):
        raise ValueError(f"the model {why}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "vitscale_config": cfg.to_json(), "class_names": json.dumps(list(class_names or []))}
    if eval_settings is not None:
        meta["eval"] = eval_settings.to_json()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in convert.to_hf(sd).items()}
    with atomic_path(out / HF_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    settings = eval_settings or EvalSettings(image_size=cfg.image_hw)
    atomic_write(out / HF_PROCESSOR, json.dumps(hf_processor_config(settings), indent=2) + "\n")
    atomic_write(out / HF_CONFIG, json.dumps(convert.hf_config(cfg, class_names), indent=2) + "\n")
    return out


def timm_config(cfg: ViTConfig, class_names: list[str] | None, settings: EvalSettings) -> dict:
    """timm's `config.json` of a model folder (what `timm.create_model("local-dir:DIR")` and the Hub's
    `hf-hub:` read): any of our variants as timm's VisionTransformer through `model_args`, and the eval transform
    as its `pretrained_cfg`, which `timm.data.resolve_data_config` turns into the same preprocessing."""
    h, w = cfg.image_hw
    pool = {"global_pool": "avg", "fc_norm": False} if cfg.pool == "mean" else {"global_pool": "token"}
    args = {"img_size": [h, w], "patch_size": cfg.patch_size, "in_chans": cfg.in_chans, "embed_dim": cfg.width,
            "depth": cfg.depth, "num_heads": cfg.heads, "mlp_ratio": cfg.mlp_ratio, "qkv_bias": cfg.qkv_bias, **pool}
    names = list(class_names or [])
    pretrained = {"input_size": [cfg.in_chans, *settings.image_size], "crop_pct": settings.crop_pct,
                  "crop_mode": "center", "interpolation": settings.interpolation, "mean": list(settings.mean),
                  "std": list(settings.std), "num_classes": cfg.num_classes, "first_conv": "patch_embed.proj",
                  "classifier": "head", **({"label_names": names} if len(names) == cfg.num_classes else {})}
    return {"architecture": "vit_base_patch16_224", "num_classes": cfg.num_classes, "num_features": cfg.width,
            "global_pool": pool["global_pool"], "model_args": args, "pretrained_cfg": pretrained}


def save_timm_dir(out_dir: str | os.PathLike, sd: dict[str, torch.Tensor], cfg: ViTConfig,
                  class_names: list[str] | None, step: int, eval_settings: EvalSettings | None = None) -> Path:
    """Write a timm model folder: model.safetensors (our weight file: timm's names plus our metadata) +
    config.json (timm_config), loadable by `timm.create_model("local-dir:DIR", pretrained=True)` and uploadable
    to the Hub as it is."""
    if why := timm_blocker(cfg):
        raise ValueError(f"the model {why}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = eval_settings or EvalSettings(image_size=cfg.image_hw)
    save_weights(out / HF_WEIGHTS, sd, cfg, class_names, step, eval_settings=settings)
    atomic_write(out / HF_CONFIG, json.dumps(timm_config(cfg, class_names, settings), indent=2) + "\n")
    return out


def save_npz(path: str | os.PathLike, sd: dict[str, torch.Tensor], cfg: ViTConfig, layout: str = "augreg") -> Path:
    """Write a big_vision/AugReg `.npz` (see vit.convert.to_big_vision for the two layouts)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy would append .npz to a name
        np.savez(f, **convert.to_big_vision(sd, cfg, layout))
    return path
