"""Weight files: `model.safetensors` with the config in its metadata, and format detection.

Tensor names are timm's (`patch_embed.proj.weight`, ...), so `timm.create_model(name, num_classes=K)` loads
a file strictly; `load_weights` converts them back to vitscale's module names (files written before this, in
vitscale's names, read the same: the conversion is idempotent).

Metadata: format=vitscale-vit/1, config (ViTConfig JSON), image_size, class_names (JSON list), step and,
in files written since eval settings were added, eval (EvalSettings JSON: how the weights were evaluated).
A reader of vitscale-vit/1 treats a missing key as its default, so older files keep loading.
Loading never unpickles: foreign files are identified from their header bytes and key names only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.io import atomic_path
from vit.config import ViTConfig
from vit.convert import FC_NORM, TIMM_PARTS, bv_prefix, from_timm, to_timm
from vit.model import VisionTransformer
from vit.pos_embed import resample_pos_embed

FORMAT = "vitscale-vit/1"
# The stream's normalisation (data_prep/transforms.py), copied rather than imported: vit/ depends on torch only.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("fp32", "bf16", "fp16", "amp_bf16", "amp_fp16")
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class EvalSettings:
    """How weights are evaluated: input size, centre-crop fraction, resize filter and normalisation.

    Stored with the weights so that an eval of the file reproduces the run's own reported accuracy
    (the defaults are the stream's eval transform: resize to image_size / crop_pct, bilinear, ImageNet stats).
    """

    image_size: tuple[int, int]
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # how the run evaluated: "bf16"/"fp16" = weights cast (DeepSpeed), "amp_bf16"/"amp_fp16" = fp32 weights
    # under autocast (Accelerate), "fp32"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        size = self.image_size
        hw = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
        # frozen: normalise the JSON lists / int size through object.__setattr__
        object.__setattr__(self, "image_size", hw)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(hw) != 2 or min(hw) <= 0:
            raise ValueError(f"eval image_size must be (height, width) > 0, got {size!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"eval crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"eval interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.mean) != len(self.std) or min(self.std, default=0.0) <= 0.0:
            raise ValueError(f"eval mean/std must have one entry per channel, std > 0: {self.mean}, {self.std}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"eval precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def to_dict(self) -> dict:
        return json.loads(self.to_json())

    def replace(self, **changes) -> EvalSettings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, text: str) -> EvalSettings:
        """Parse `to_json` output; unknown keys are an error (ignoring one could silently change an eval)."""
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> EvalSettings:
        """The settings `to_dict` gave (as a checkpoint's state stores them); unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or "image_size" not in d or set(d) - known:
            raise ValueError(f"bad eval settings {d!r}: expected a JSON object with image_size and only {known}")
        return cls(**d)


def save_weights(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    cfg: ViTConfig,
    class_names: list[str] | None = None,
    step: int | None = None,
    eval_settings: EvalSettings | None = None,
) -> Path:
    """Write `state_dict` and its config to a safetensors file, atomically (temp name, then rename).

    `eval_settings` (stored as metadata key "eval") is how the run evaluated these weights; None leaves it
    out and readers then use the defaults at the config's image size.
    """
    path = Path(path)
    meta = {
        "format": FORMAT,
        "config": cfg.to_json(),
        "image_size": json.dumps(list(cfg.image_hw)),
        "class_names": json.dumps(list(class_names or [])),
        "step": str(-1 if step is None else int(step)),
    }
    if eval_settings is not None:
        meta["eval"] = eval_settings.to_json()
    # timm's names on disk: the file is a timm state dict too (vit.convert.to_timm; idempotent)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_timm(state_dict).items()}
    with atomic_path(path) as tmp:  # removed if the write fails (a full disk): no half file, old one kept
        save_file(tensors, str(tmp), metadata=meta)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The decoded metadata of a weight file: config (ViTConfig), image_size, class_names, step, eval.

    `eval` is an EvalSettings; files written without one get the defaults at the config's image size.
    """
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a vitscale weight file (format={meta.get('format')!r}, expected {FORMAT!r}); "
            "for a timm state dict use vit.weights.from_timm, for a run dir use `python -m pretrain export`"
        )
    cfg = ViTConfig.from_json(meta["config"])
    return {
        "config": cfg,
        "image_size": tuple(json.loads(meta["image_size"])),
        "class_names": json.loads(meta["class_names"]),
        "step": int(meta["step"]),
        "eval": EvalSettings.from_json(meta["eval"]) if "eval" in meta else EvalSettings(image_size=cfg.image_hw),
    }


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a vitscale weight file: (state dict on CPU in vitscale's key names, metadata as in `read_metadata`)."""
    meta = read_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return from_timm(sd), meta


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


@dataclass(frozen=True)
class WeightFormat:
    """What a weight file or folder holds, told from header bytes and key names (nothing is unpickled).

    `kind` is one of LOADABLE for what loads (vit.interop.read_any reads each; then `found`/`fix` are
    informative only), else one of "missing", "unreadable", "empty", "folder", "hf-unsupported", "pickle",
    "npz", "not-safetensors", "timm-unsupported", "not-vit". `message(path)` is the one-line error for what
    does not load: what was found, then the fix. ("run-dir" is added by finetune.load.describe_init.)
    """

    kind: str
    found: str
    fix: str = ""

    @property
    def loadable(self) -> bool:
        return self.kind in LOADABLE

    def message(self, path: str | os.PathLike) -> str:
        return f"{path} {self.found}" + (f"; {self.fix}" if self.fix else "")


_TOKEN_VIT = "vitscale fine-tunes cls-token ViTs: use a checkpoint trained with timm global_pool='token'"
_HF_FIX = "use a plain ViT (transformers ViTForImageClassification / ViTModel, model_type 'vit')"
# what vit.interop.read_any reads: our files, timm and transformers ViT safetensors, HF and timm folders,
# big_vision .npz
LOADABLE = ("vitscale", "timm-vit", "hf-vit", "hf-folder", "timm-folder", "bv-npz")
_PICKLE_FIX = ("if you trust its source, convert it: sd = torch.load(path, weights_only=True); "
               "safetensors.torch.save_file(sd, 'model.safetensors')")
# transformers' ViT family (ViT, DeiT, BEiT, DINOv2, ViTMAE): `[vit.]embeddings.patch_embeddings.projection.*`.
# `encoder.layer.N` alone is not enough: BERT-style text models share it. Only the plain ViT's prefix
# (`vit.`, or none for a bare ViTModel) loads; `deit.`, `beit.`, `dinov2.`... are named.
_HF_KEY = re.compile(r"^(?:(\w+)\.)?embeddings\.patch_embeddings\.")


def _examples(keys: list[str], n: int = 3) -> str:
    """A few key names for an error: weights first (they name layers better than running stats)."""
    picked = ([k for k in keys if k.endswith(".weight")] + keys)[:n]
    return ", ".join(dict.fromkeys(picked)) + (", ..." if len(keys) > n else "")


def describe_state_dict(keys: Iterable[str], metadata: dict[str, str] | None = None) -> WeightFormat:
    """Classify a safetensors state dict by its key names (and metadata): the one place formats are told apart.

    Loadable: a vitscale weight file, or a class-token ViT in timm (or vitscale) key names. Anything else
    comes back with what it is and how to make it loadable.
    """
    keys, meta = list(keys), metadata or {}
    if meta.get("format") == FORMAT:
        return WeightFormat("vitscale", "is a vitscale weight file")
    if not keys:
        return WeightFormat("not-vit", "is a safetensors file without tensors", "pass a ViT weight file")
    if hf := next((m for k in keys if (m := _HF_KEY.search(k))), None):
        if hf.group(1) in (None, "vit"):
            return WeightFormat("hf-vit", "is a Hugging Face transformers ViT state dict")
        return WeightFormat("hf-unsupported", f"is a Hugging Face transformers {hf.group(1)} model (keys like "
                            f"{hf.string}), which is not a plain ViT", _HF_FIX)
    has = set(keys)
    if not ({"patch_embed.proj.weight", "patch_embed.weight"} & has and any(k.startswith("blocks.0.") for k in keys)):
        return WeightFormat("not-vit", f"has no ViT keys (saw e.g. {_examples(keys)})",
                            "pass a ViT: patch_embed.proj.weight, pos_embed, cls_token, blocks.N.* (timm names)")
    if any(re.search(FC_NORM, k) for k in keys):  # timm puts fc_norm after mean pooling, never with the cls token
        return WeightFormat("timm-unsupported", "is a timm ViT with an avg-pool head with fc_norm: not a cls-token ViT",
                            _TOKEN_VIT + " (fc_norm=False)")
    for pat, part in TIMM_PARTS:
        if any(re.search(pat, k) for k in keys):
            return WeightFormat("timm-unsupported", f"is a timm ViT with {part}, which vitscale's ViT lacks",
                                "use a plain ViT checkpoint (timm vit_* without these options)")
    if "cls_token" not in has or "pos_embed" not in has:
        what = "class token (timm class_token=False)" if "cls_token" not in has else "pos_embed"
        return WeightFormat("timm-unsupported", f"is a ViT without a {what}",
                            "vitscale fine-tunes ViTs with a class token and learned position embeddings")
    return WeightFormat("timm-vit", "is a ViT state dict in timm key names")


def _describe_zip(path: Path) -> WeightFormat:
    """A zip archive: torch.save's pickle container or NumPy's .npz (big_vision/AugReg), by member names."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return WeightFormat("not-safetensors", f"is not a safetensors file (a damaged zip archive: {e})",
                            "pass a .safetensors file")
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return WeightFormat("pickle", "is not a safetensors file but a pickled torch.save checkpoint "
                            "(refused: unpickling can run code)", _PICKLE_FIX)
    if names and all(n.endswith(".npy") for n in names):  # numpy.savez: one `{key}.npy` member per array
        return _describe_npz([n.removesuffix(".npy") for n in names])
    return WeightFormat("not-safetensors", f"is not a safetensors file but a zip archive (saw {_examples(names)})",
                        "pass a .safetensors file")


def _describe_npz(keys: list[str]) -> WeightFormat:
    """A NumPy .npz by its array names: a class-token big_vision/AugReg ViT loads, anything else is named."""
    prefix = bv_prefix(keys)
    if prefix is None:
        return WeightFormat("npz", f"is a NumPy .npz archive without ViT parameters (saw {_examples(keys)})",
                            "pass a big_vision/AugReg ViT .npz (embedding/kernel, cls, Transformer/...)")
    if f"{prefix}cls" not in keys:
        pool = "map" if any(k.startswith(f"{prefix}MAPHead_0/") for k in keys) else "gap"
        return WeightFormat("npz", f"is a big_vision ViT .npz without a class token (pool_type {pool!r}): an "
                            "avg-pool model", "vitscale fine-tunes class-token ViTs: use a pool_type 'tok' checkpoint")
    return WeightFormat("bv-npz", "is a big_vision/AugReg ViT .npz checkpoint (JAX)")


def _describe_folder(path: Path) -> WeightFormat:
    """A folder: a transformers ViT folder and a timm model folder (Hub layout) holding a ViT load; other
    transformers models and anything else are named."""
    files = sorted(p.name for p in path.iterdir())
    weights = [n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin") if n in files]
    if "config.json" in files and weights:
        try:
            conf = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            conf = {}
        conf = conf if isinstance(conf, dict) else {}
        if "architecture" in conf and weights[0] == "model.safetensors":  # timm's Hub layout (export --format timm-dir)
            found, inner = f"is a timm model folder ({conf['architecture']})", identify_weights(path / weights[0])
            if inner.loadable:
                return WeightFormat("timm-folder", found)
            return WeightFormat(inner.kind, f"{found} whose model.safetensors {inner.found}", inner.fix)
        found = f"is a Hugging Face transformers model folder (config.json + {weights[0]})"
        if conf.get("model_type") != "vit":
            return WeightFormat("hf-unsupported", f"{found} of model_type {conf.get('model_type')!r}, not 'vit'",
                                _HF_FIX)
        if weights[0] == "pytorch_model.bin":
            return WeightFormat("pickle", f"{found}: a pickle (refused: unpickling can run code)",
                                "if you trust it: ViTForImageClassification.from_pretrained(path)"
                                ".save_pretrained(path) writes model.safetensors")
        return WeightFormat("hf-folder", found)
    inside = [n for n in files if n.endswith(".safetensors")]
    fix = f"pass the weight file inside ({path / inside[0]})" if len(inside) == 1 else "pass a .safetensors file"
    return WeightFormat("folder", f"is a folder without a known layout (holds {_examples(files) or 'nothing'})", fix)


def identify_weights(path: str | os.PathLike) -> WeightFormat:
    """What `path` holds, read without unpickling: folder layout, file header bytes, then safetensors keys."""
    path = Path(path)
    if not path.exists():
        return WeightFormat("missing", "does not exist", "pass the path of a .safetensors weight file")
    if path.is_dir():
        return _describe_folder(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:  # e.g. no read permission
        return WeightFormat("unreadable", f"cannot be read ({e.strerror})", "check the path and its permissions")
    if not head:
        return WeightFormat("empty", "is empty (0 bytes)", "re-copy or re-export the weight file")
    if head.startswith(b"PK\x03\x04"):
        return _describe_zip(path)
    pickled = WeightFormat("pickle", "is not a safetensors file but a pickled PyTorch checkpoint "
                           "(refused: unpickling can run code)", _PICKLE_FIX)
    if head[:1] == b"\x80":  # pickle protocol 2+: legacy torch.save and plain pickles start so
        return pickled
    try:  # safe_open parses the JSON header only; no tensor is read
        with safe_open(str(path), framework="pt") as f:
            return describe_state_dict(list(f.keys()), f.metadata())
    except Exception as e:  # any parse failure means "not safetensors"; the reason goes into the message
        if path.suffix in (".pth", ".pt", ".bin", ".ckpt", ".pkl"):  # protocol 0/1 pickles have no magic byte
            return pickled
        why = " ".join(str(e).split())[:120]
        return WeightFormat("not-safetensors", f"is not a safetensors file ({why})", "pass a .safetensors file")
