"""`python -m pretrain export` and `eval`: consolidate ZeRO shards into one weight file; evaluate weights.

Consolidation reads DeepSpeed's own checkpoint files from the run dir (DeepSpeed's format is a pickle:
every file is first checked by `checkpoint.check_pickles`, which refuses anything that could run code);
what we write is safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig
from pretrain.train import model_config
from runtime.config import load_config
from runtime.io import atomic_path
from vit import VisionTransformer, ViTConfig
from vit.weights import load_weights, save_weights, to_timm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def consolidate(run_dir: str | Path, tag: str | None = None, ema: bool = False) -> tuple[dict, ViTConfig, dict]:
    """(fp32 state dict, ViTConfig, trainer state) of checkpoint `tag` (default: latest) of a run dir."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or ckpt.latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint (no `latest`); train first")
    ckpt.check_pickles(ckpt_dir / tag)  # zero_to_fp32 and ds_to_universal unpickle without restriction
    state = ckpt.read_state(ckpt_dir, tag)
    cfg = load_config(PretrainConfig, run_dir / "config.yaml")
    vcfg = model_config(cfg, len(state["class_names"]))
    if ema:
        sd = ckpt.load_ema(ckpt_dir, tag)
        if sd is None:
            raise FileNotFoundError(f"checkpoint {tag} has no EMA weights (train.ema_decay was 0)")
    else:
        try:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except ValueError:  # bf16 with ZeRO 0/1 uses DeepSpeed's BF16_Optimizer, which zero_to_fp32 cannot read
            sd = ckpt.universal_state_dict(ckpt_dir, tag)
    return {k: v.float() for k, v in sd.items()}, vcfg, state


def export(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None, ema: bool = False,
           dtype: str = "fp32", timm: bool = False) -> Path:
    """Write `model.safetensors` (DESIGN contract 3) from a run dir; `timm=True` writes timm key names."""
    sd, vcfg, state = consolidate(run_dir, tag, ema)
    VisionTransformer(vcfg).load_state_dict(sd, strict=True)  # the contract: every key, right shapes
    sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
    out = Path(out) if out else Path(run_dir) / "export" / "model.safetensors"
    if not timm:
        return save_weights(out, sd, vcfg, class_names=state["class_names"], step=state["step"])
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in to_timm(sd).items()}, str(tmp),
                  metadata={"format": "pt", "vitscale_config": vcfg.to_json(),
                            "class_names": json.dumps(state["class_names"])})
    return out


def load_for_eval(source: str | Path, image_size: int | None) -> tuple[VisionTransformer, list[str]]:
    """A model from a weight file or a run dir (consolidated on the fly), at `image_size` if given."""
    from vit.weights import adapt_pos_embed

    source = Path(source)
    if source.is_dir():
        sd, vcfg, state = consolidate(source)
        names = state["class_names"]
    else:
        sd, meta = load_weights(source)
        vcfg, names = meta["config"], meta["class_names"]
    dst = vcfg.replace(image_size=image_size) if image_size else vcfg
    model = VisionTransformer(dst)
    model.load_state_dict(adapt_pos_embed(sd, vcfg, dst), strict=True)
    return model, names


def evaluate_weights(source: str | Path, overrides: list[str]) -> dict:
    """Top-1/top-5 of weights (file or run dir) on `data.path`'s val split; runs under torchrun too."""
    from data_prep.stream import build_loader, normalize
    from runtime.dist import detect, init_distributed, shutdown
    from runtime.training import evaluate

    base = Path(source) / "config.yaml" if Path(source).is_dir() else None
    cfg = load_config(PretrainConfig, base, overrides)
    if not cfg.data.path:
        raise ValueError("eval needs data.path=.../dataset.json")
    env = init_distributed(detect(), timeout_s=cfg.dist.timeout)
    model, _ = load_for_eval(source, cfg.model.image_size or None)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    size = model.cfg.image_hw
    loader = build_loader(cfg.data, cfg.data.val_split or "val", train=False, dist_env=env, image_size=size,
                          micro_batch=cfg.eval.micro_batch or 64, seed=cfg.run.seed, device=device)

    def prepare(images, labels):
        return normalize(images, dtype=torch.float32, device=device), labels.to(device)

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        metrics = evaluate(model, loader, prepare)
    shutdown()
    return metrics
