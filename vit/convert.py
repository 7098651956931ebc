"""Every conversion between vitscale's ViT state dict and the ecosystem's layouts, in one place.

- timm (`timm.models.vision_transformer.VisionTransformer`): a renaming (`patch_embed.proj.*`,
  `head.pre_logits.fc.*`); vitscale weight files store these names, so timm loads them strictly.
- Hugging Face transformers (`ViTForImageClassification`): the hub's key names (`vit.embeddings.*`,
  `vit.encoder.layer.N.attention.attention.query.*`, `classifier.*`), q/k/v split, and `config.json`;
  transformers 5's in-memory names (`vit.layers.N.attention.q_proj.*`) are read too.
- big_vision / AugReg `.npz` (JAX/Flax): kernels transposed, heads kept apart in attention. Two layouts:
  AugReg's (`Transformer/posembed_input/pos_embedding` with the class token's position,
  `MultiHeadDotProductAttention_1`, `MlpBlock_3`) and big_vision's (`pos_embedding` for the patches only,
  the class token added after it, `MultiHeadDotProductAttention_0`, `MlpBlock_0`, optionally stacked blocks).

Functions map state dicts, never files (vit.interop reads and writes those), and raise ValueError naming
the first thing that does not fit (ConversionError). Nothing here imports vit.weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch

from vit.config import ViTConfig, variant_names, vit_config


class ConversionError(ValueError):
    """The weights do not fit vitscale's ViT (a part it lacks, a missing tensor): the message says which."""

# ---------------------------------------------------------------- timm
# Our key <-> timm key. Everything else (cls_token, pos_embed, blocks.*, norm, head) has the same name.
_TO_TIMM = [
    (r"^patch_embed\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^pre_logits\.fc\.(weight|bias)$", r"head.pre_logits.fc.\1"),
]
_FROM_TIMM = [
    (r"^patch_embed\.proj\.(weight|bias)$", r"patch_embed.\1"),
    (r"^head\.pre_logits\.fc\.(weight|bias)$", r"pre_logits.fc.\1"),
]
# timm parts our ViT does not have: (key pattern, what to call it in an error). Refused, never silently
# dropped. (timm's mean pooling puts a LayerNorm after the pooling, `fc_norm`; ours normalises before it,
# as big_vision does, and a timm model created with `fc_norm=False` matches.)
FC_NORM = r"^fc_norm\."
TIMM_PARTS = [
    (r"\.ls[12]\.", "layer-scale (blocks.*.ls1/ls2, e.g. DeiT-III or DINOv2)"),
    (r"^reg_token$", "register tokens (reg_token)"),
    (r"\.(q|k)_norm\.", "query/key normalisation (blocks.*.attn.q_norm/k_norm)"),
    (r"^attn_pool\.", "an attention-pool head (attn_pool, e.g. SigLIP)"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (norm_pre, e.g. CLIP)"),
    (r"^dist_token$", "a distillation token (dist_token, distilled DeiT)"),
]
_TIMM_UNSUPPORTED = re.compile("|".join([FC_NORM] + [pat for pat, _ in TIMM_PARTS]))


def _rename(sd: Mapping[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for pat, rep in rules:
            if re.match(pat, k):
                k = re.sub(pat, rep, k)
                break
        out[k] = v
    return out


def to_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> timm `VisionTransformer` key names (idempotent)."""
    return _rename(sd, _TO_TIMM)


def from_timm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `VisionTransformer` state dict (or ours: idempotent) -> our key names.

    Refuses layer-scale, register tokens and other parts our model does not have, rather than
    silently dropping them.
    """
    unsupported = [k for k in sd if _TIMM_UNSUPPORTED.search(k)]
    if unsupported:
        raise ConversionError(f"timm weights use parts vitscale's ViT does not have: {unsupported[:4]}")
    return _rename(sd, _FROM_TIMM)


def config_from_shapes(sd: Mapping[str, torch.Tensor], heads: int | None = None) -> ViTConfig:
    """A ViTConfig from the shapes of a state dict in our key names; `heads` from the paper variant if None
    (attention heads leave no trace in the shapes of a fused qkv)."""
    if not {"patch_embed.weight", "pos_embed", "blocks.0.mlp.fc1.weight"} <= set(sd):
        raise ConversionError("it lacks patch_embed, pos_embed or blocks.0.mlp.fc1: not a complete ViT")
    width, in_chans, patch, _ = sd["patch_embed.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    side = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    if heads is None:
        match = [v for v in variant_names() if (c := vit_config(v)).width == width and c.depth == depth]
        if not match:
            raise ConversionError(f"width {width}, depth {depth} is no known variant, so the number of attention "
                             "heads is unknown; set model.variant to its architecture")
        heads = vit_config(match[0]).heads
    rep = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    try:
        return ViTConfig(image_size=side * patch, patch_size=patch, in_chans=in_chans, width=width, depth=depth,
                         heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / width,
                         num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                         representation_size=rep, qkv_bias="blocks.0.attn.qkv.bias" in sd)
    except ValueError as e:  # width not divisible by heads, ...
        raise ConversionError(f"its shapes do not describe a vitscale ViT ({e}); set model.variant to its "
                              "architecture or pass a plain ViT") from e


# ---------------------------------------------------------------- Hugging Face transformers
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection": "patch_embed", "layernorm": "norm",
           "pooler.dense": "pre_logits.fc"}
# block sub-module: hub names (transformers 4, and what 5 saves) and transformers 5's in-memory names
_HF_BLOCK = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "attention.o_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict (one linear head, no pre-logits layer) -> `ViTForImageClassification` hub key names."""
    top = {ours: theirs for theirs, ours in _HF_TOP.items()}
    block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
             "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("head."):
            out["classifier." + k.removeprefix("head.")] = v
        elif m := re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", k):
            i, mod, kind = m.groups()
            pre = f"vit.encoder.layer.{i}."
            if mod == "attn.qkv":
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0), strict=True):
                    out[f"{pre}attention.attention.{name}.{kind}"] = part.contiguous()
            else:
                out[f"{pre}{block[mod]}.{kind}"] = v
        else:
            stem, _, kind = k.rpartition(".") if k.endswith((".weight", ".bias")) else (k, "", "")
            out["vit." + top[stem] + (f".{kind}" if kind else "")] = v
    return out


def from_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ViT state dict (`ViTForImageClassification`/`ViTModel`, with or without the `vit.`
    prefix; hub or transformers-5 names) -> our key names. Unknown keys (a mask token, a decoder) are refused."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], list] = {}
    top = sorted(_HF_TOP.items(), key=lambda kv: -len(kv[0]))
    for key, v in sd.items():
        if key.startswith("classifier."):
            out["head." + key.removeprefix("classifier.")] = v
            continue
        k = key.removeprefix("vit.")
        if m := _HF_LAYER.match(k):
            i, mod, kind = m.groups()
            if mod in _HF_QKV:
                qkv.setdefault((i, kind), [None] * 3)[_HF_QKV[mod]] = v
                continue
            if mod in _HF_BLOCK:
                out[f"blocks.{i}.{_HF_BLOCK[mod]}.{kind}"] = v
                continue
        for theirs, ours in top:
            if k == theirs or k.startswith(theirs + "."):
                out[ours + k[len(theirs):]] = v
                break
        else:
            raise ConversionError(f"Hugging Face key {key} has no place in vitscale's ViT (not a plain ViT)")
    for (i, kind), parts in qkv.items():
        if any(p is None for p in parts):
            raise ConversionError(f"Hugging Face layer {i} lacks one of query/key/value {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def hf_config(cfg: ViTConfig, class_names: list[str] | None = None) -> dict:
    """transformers' `config.json` for `ViTForImageClassification` of `cfg` (exact GELU, our LayerNorm eps)."""
    names = list(class_names or []) or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        names = [f"LABEL_{i}" for i in range(cfg.num_classes)]
    h, w = cfg.image_hw
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": cfg.width,
            "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02, "layer_norm_eps": cfg.norm_eps, "image_size": h if h == w else [h, w],
            "patch_size": cfg.patch_size, "num_channels": cfg.in_chans, "qkv_bias": cfg.qkv_bias,
            "encoder_stride": cfg.patch_size, "id2label": {str(i): n for i, n in enumerate(names)},
            "label2id": {n: i for i, n in enumerate(names)}, "torch_dtype": "float32"}


def config_from_hf(conf: Mapping, sd: Mapping[str, torch.Tensor]) -> ViTConfig:
    """Our ViTConfig from a transformers ViT `config.json` and the converted state dict (head and pre-logits
    sizes come from the tensors: a `ViTModel` has no classifier)."""
    if conf.get("model_type") != "vit":
        raise ConversionError(f"model_type {conf.get('model_type')!r} is not a plain ViT (model_type 'vit')")
    if conf.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"hidden_act {conf['hidden_act']!r} differs from vitscale's exact GELU")
    patch = conf.get("patch_size", 16)
    patch = patch[0] if isinstance(patch, list | tuple) and patch[0] == patch[-1] else patch
    if not isinstance(patch, int):
        raise ConversionError(f"non-square patch_size {patch} is not supported")
    size = conf.get("image_size", 224)
    width = int(conf.get("hidden_size", 768))
    return ViTConfig(image_size=tuple(size) if isinstance(size, list) else int(size), patch_size=patch,
                     in_chans=int(conf.get("num_channels", 3)), width=width,
                     depth=int(conf.get("num_hidden_layers", 12)), heads=int(conf.get("num_attention_heads", 12)),
                     mlp_ratio=int(conf.get("intermediate_size", 3072)) / width,
                     num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
                     representation_size=sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd
                     else None, qkv_bias=bool(conf.get("qkv_bias", True)),
                     norm_eps=float(conf.get("layer_norm_eps", 1e-12)))


# ---------------------------------------------------------------- big_vision / AugReg .npz
# block sub-module names: (attention, second LayerNorm, MLP) per layout
_BV_SUBS = {"augreg": ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
            "big_vision": ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")}
BV_LAYOUTS = tuple(_BV_SUBS)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


def to_big_vision(sd: Mapping[str, torch.Tensor], cfg: ViTConfig, layout: str = "augreg") -> dict[str, np.ndarray]:
    """Our state dict -> big_vision/AugReg `.npz` arrays (the keys `numpy.savez` writes).

    "augreg" keeps the class token's position inside `Transformer/posembed_input/pos_embedding` (exact round
    trip); "big_vision" has patch positions only (`pos_embedding`), so the class token's position is added
    to `cls`: the same function, and the class token's two parts come back summed.
    """
    if layout not in _BV_SUBS:
        raise ValueError(f"layout must be one of {BV_LAYOUTS}, got {layout!r}")
    mha, ln2, mlp = _BV_SUBS[layout]
    D, H = cfg.width, cfg.heads
    pos, cls = _np(sd["pos_embed"]), _np(sd["cls_token"])
    out = {"embedding/kernel": _np(sd["patch_embed.weight"]).transpose(2, 3, 1, 0),  # (D,C,P,P) -> (P,P,C,D)
           "embedding/bias": _np(sd["patch_embed.bias"]),
           "Transformer/encoder_norm/scale": _np(sd["norm.weight"]),
           "Transformer/encoder_norm/bias": _np(sd["norm.bias"])}
    if layout == "augreg":
        out["cls"], out["Transformer/posembed_input/pos_embedding"] = cls, pos
    else:
        out["cls"], out["pos_embedding"] = cls + pos[:, :1], pos[:, 1:]
    for name, ours in (("pre_logits", "pre_logits.fc"), ("head", "head")):
        if f"{ours}.weight" in sd:
            out[f"{name}/kernel"], out[f"{name}/bias"] = _np(sd[f"{ours}.weight"]).T, _np(sd[f"{ours}.bias"])
    for i in range(cfg.depth):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        for bv, ours in (("LayerNorm_0", "norm1"), (ln2, "norm2")):
            out[f"{p}{bv}/scale"], out[f"{p}{bv}/bias"] = _np(sd[f"{b}{ours}.weight"]), _np(sd[f"{b}{ours}.bias"])
        qkv_w = _np(sd[f"{b}attn.qkv.weight"]).reshape(3, D, D)  # (3 * H * Dh, D) -> (3, H * Dh, D)
        for j, name in enumerate(("query", "key", "value")):
            out[f"{p}{mha}/{name}/kernel"] = qkv_w[j].T.reshape(D, H, D // H)
            if f"{b}attn.qkv.bias" in sd:
                out[f"{p}{mha}/{name}/bias"] = _np(sd[f"{b}attn.qkv.bias"]).reshape(3, H, D // H)[j]
        out[f"{p}{mha}/out/kernel"] = _np(sd[f"{b}attn.proj.weight"]).T.reshape(H, D // H, D)
        out[f"{p}{mha}/out/bias"] = _np(sd[f"{b}attn.proj.bias"])
        for r in range(2):
            out[f"{p}{mlp}/Dense_{r}/kernel"] = _np(sd[f"{b}mlp.fc{r + 1}.weight"]).T
            out[f"{p}{mlp}/Dense_{r}/bias"] = _np(sd[f"{b}mlp.fc{r + 1}.bias"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


class _Arrays:
    """The arrays of a checkpoint under a prefix, each taken once: what is left over is named, not dropped."""

    def __init__(self, arrays: Mapping[str, np.ndarray], prefix: str):
        self.a = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
        self.left = set(self.a)

    def has(self, key: str) -> bool:
        return key in self.a

    def take(self, key: str, idx: int | None = None) -> torch.Tensor:
        if key not in self.a:
            raise ConversionError(f"the .npz lacks {key}")
        self.left.discard(key)
        v = self.a[key] if idx is None else self.a[key][idx]
        return torch.from_numpy(np.asarray(v, dtype=np.float32).copy())


def bv_prefix(names: list[str]) -> str | None:
    """The prefix of the ViT parameters in an `.npz`'s names ('', 'params/', 'opt/target/'), None if absent."""
    for prefix in ("", "params/", "opt/target/"):
        if f"{prefix}embedding/kernel" in names:
            return prefix
    return None


def from_big_vision(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], ViTConfig]:
    """big_vision/AugReg `.npz` arrays (either layout, stacked blocks too) -> (our state dict, its ViTConfig)."""
    prefix = bv_prefix(list(arrays))
    if prefix is None:
        raise ConversionError("the .npz holds no ViT parameters (no embedding/kernel)")
    w = _Arrays(arrays, prefix)
    if not w.has("cls"):
        raise ConversionError("it is a ViT without a class token (big_vision pool_type 'gap' or 'map'); vitscale "
                         "fine-tunes class-token ViTs: use a checkpoint trained with pool_type 'tok'")
    layout = "big_vision" if w.has("pos_embedding") or w.has("Transformer/encoderblock/LayerNorm_0/scale") \
        else "augreg"
    mha, ln2, mlp = _BV_SUBS[layout]
    kernel = w.take("embedding/kernel")  # (P, P, C, D)
    sd = {"patch_embed.weight": kernel.permute(3, 2, 0, 1).contiguous(), "patch_embed.bias": w.take("embedding/bias"),
          "cls_token": w.take("cls").reshape(1, 1, -1), "norm.weight": w.take("Transformer/encoder_norm/scale"),
          "norm.bias": w.take("Transformer/encoder_norm/bias")}
    if layout == "augreg":
        sd["pos_embed"] = w.take("Transformer/posembed_input/pos_embedding")
    else:  # patch positions only: the class token gets a zero position (it has none in big_vision)
        pos = w.take("pos_embedding").reshape(1, -1, kernel.shape[-1])
        sd["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    for name, ours in (("pre_logits", "pre_logits.fc"), ("head", "head")):
        if w.has(f"{name}/kernel"):
            sd[f"{ours}.weight"] = w.take(f"{name}/kernel").T.contiguous()
            sd[f"{ours}.bias"] = w.take(f"{name}/bias")
    heads = _bv_blocks(w, sd, mha, ln2, mlp)
    if w.left:
        raise ConversionError(f"the .npz has parameters vitscale's ViT lacks: {', '.join(sorted(w.left)[:3])}")
    return sd, config_from_shapes(sd, heads=heads)


def _bv_blocks(w: _Arrays, sd: dict[str, torch.Tensor], mha: str, ln2: str, mlp: str) -> int:
    """Fill `sd` with the encoder blocks of `w` (numbered or stacked); returns the number of heads."""
    stacked = w.has("Transformer/encoderblock/LayerNorm_0/scale")
    depth = (w.a["Transformer/encoderblock/LayerNorm_0/scale"].shape[0] if stacked
             else len({k.split("/")[1] for k in w.a if k.startswith("Transformer/encoderblock_")}))
    heads = 0
    for i in range(depth):
        p, idx, b = ("Transformer/encoderblock/", i, f"blocks.{i}.") if stacked else \
            (f"Transformer/encoderblock_{i}/", None, f"blocks.{i}.")
        for bv, ours in (("LayerNorm_0", "norm1"), (ln2, "norm2")):
            sd[f"{b}{ours}.weight"], sd[f"{b}{ours}.bias"] = w.take(f"{p}{bv}/scale", idx), w.take(f"{p}{bv}/bias", idx)
        q = [w.take(f"{p}{mha}/{n}/kernel", idx) for n in ("query", "key", "value")]  # (D, H, Dh) each
        heads = q[0].shape[1]
        sd[f"{b}attn.qkv.weight"] = torch.cat([t.flatten(1).T for t in q], dim=0).contiguous()
        if w.has(f"{p}{mha}/query/bias"):
            sd[f"{b}attn.qkv.bias"] = torch.cat([w.take(f"{p}{mha}/{n}/bias", idx).reshape(-1)
                                                 for n in ("query", "key", "value")])
        sd[f"{b}attn.proj.weight"] = w.take(f"{p}{mha}/out/kernel", idx).flatten(0, 1).T.contiguous()
        sd[f"{b}attn.proj.bias"] = w.take(f"{p}{mha}/out/bias", idx)
        for r in range(2):
            sd[f"{b}mlp.fc{r + 1}.weight"] = w.take(f"{p}{mlp}/Dense_{r}/kernel", idx).T.contiguous()
            sd[f"{b}mlp.fc{r + 1}.bias"] = w.take(f"{p}{mlp}/Dense_{r}/bias", idx)
    return heads
