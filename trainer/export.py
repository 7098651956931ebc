"""Export: the core's checkpoint -> one weight file, in-process, for both stages (see docs/architecture.md).

A checkpoint's trainer_state.json names the backend that wrote it and holds the model's ViTConfig, class
names and eval settings, so nothing but the checkpoint folder is needed. The backend's `consolidate` reads
its own files (DeepSpeed's are checked by `check_pickles` before it unpickles them); what is written is
safetensors.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from runtime.config import ConfigError
from runtime.io import atomic_write, output_problem
from runtime.progress import progress_bar
from trainer import checkpoint as ckpt
from trainer.model_card import model_card
from vit import VisionTransformer, ViTConfig
from vit.interop import hf_blocker, read_any, save_hf, save_timm_dir, timm_blocker
from vit.weights import EvalSettings, adapt_pos_embed, identify_weights, save_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = {"deepspeed": "trainer.backend_deepspeed", "accelerate": "trainer.backend_accelerate"}


def _checkpoint(run_dir: Path, tag: str | None) -> tuple[Path, str, dict]:
    ckpt_dir = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise ConfigError(f"run dir {run_dir} does not exist; pass a training run's run.dir")
    complete = sorted((p.parent.name for p in ckpt_dir.glob(f"*/{ckpt.STATE_FILE}")), key=lambda n: (len(n), n))
    if tag and tag not in complete:  # a tag given by hand: name the ones there are
        raise ConfigError(f"{ckpt_dir} has no complete checkpoint {tag}; it has "
                          f"{', '.join(complete) if complete else 'none'}: pass one of those to --tag")
    tag = tag or ckpt.latest_tag(ckpt_dir)
    if tag is None or tag not in complete:
        raise ConfigError(f"{ckpt_dir} holds no complete checkpoint (no `latest`); train first, or pass a weight file")
    state = ckpt.read_state(ckpt_dir, tag)
    return ckpt_dir, tag, ckpt.check_resumable(ckpt_dir, tag, state.get("backend", "?"))


def consolidate(run_dir: str | Path, tag: str | None = None, ema: bool = False
                ) -> tuple[dict[str, torch.Tensor], ViTConfig, dict]:
    """(fp32 state dict, ViTConfig, trainer state) of checkpoint `tag` (default: latest) of a run dir."""
    ckpt_dir, tag, state = _checkpoint(Path(run_dir), tag)
    vcfg = ViTConfig.from_json(state["vit_config"])
    if ema:
        sd = ckpt.load_ema(ckpt_dir, tag)
        if sd is None:
            raise ConfigError(f"checkpoint {tag} has no EMA weights (train.ema_decay was 0); export without --ema")
    else:
        sd = importlib.import_module(BACKENDS[state["backend"]]).consolidate(ckpt_dir, tag)
    return {k: v.float() for k, v in sd.items()}, vcfg, state


FORMATS = ("vitscale", "timm", "timm-dir", "hf")
FOLDERS = {"hf": "hf", "timm-dir": "timm"}  # the formats that write a folder, and its default name under RUN/export


def export(run_dir: str | Path, out: str | Path | None = None, tag: str | None = None, ema: bool = False,
           dtype: str = "fp32", timm: bool = False, fmt: str = "vitscale") -> Path:
    """Write a run dir's checkpoint as `fmt`; `timm=True` is `fmt="timm"` (the old `--timm`).

    vitscale (default, RUN/export/model.safetensors): timm's tensor names plus our metadata (config, class
    names, eval settings), so timm loads it strictly and our loaders read it. timm: the same file, refused
    for a model timm's ViT cannot hold (the tanh pre-logits layer). timm-dir (RUN/export/timm/): that file as
    a timm model folder with its config.json (`timm.create_model("local-dir:DIR", pretrained=True)`, the eval
    transform as `pretrained_cfg`), refused likewise. hf (RUN/export/hf/): a transformers
    `ViTForImageClassification` folder, config.json + model.safetensors + preprocessor_config.json.
    """
    fmt = "timm" if timm else fmt
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    dest = Path(out) if out else Path(run_dir) / "export" / FOLDERS.get(fmt, "model.safetensors")
    check_destination(dest, folder=fmt in FOLDERS)  # before minutes of consolidating
    with progress_bar(total=3, desc="export", unit="phase") as bar:  # a big checkpoint takes minutes per phase
        bar.set_postfix_str("consolidating the checkpoint")
        sd, vcfg, state = consolidate(run_dir, tag, ema)
        bar.update(1)
        bar.set_postfix_str("checking the weights")
        VisionTransformer(vcfg).load_state_dict(sd, strict=True)  # the contract: every key, right shapes
        why = {"timm": timm_blocker, "timm-dir": timm_blocker, "hf": hf_blocker}.get(fmt, lambda _: None)(vcfg)
        if why:  # before anything is written
            raise ConfigError(f"{run_dir}: the model {why}")
        sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
        settings = EvalSettings.from_dict(state["eval_settings"])
        bar.update(1)
        bar.set_postfix_str("writing")
        if fmt == "hf":
            written = save_hf(dest, sd, vcfg, state["class_names"], settings)
        elif fmt == "timm-dir":
            written = save_timm_dir(dest, sd, vcfg, state["class_names"], state["step"], settings)
        else:
            written = save_weights(dest, sd, vcfg, state["class_names"], state["step"], eval_settings=settings)
        if fmt in FOLDERS:  # a folder the Hub takes as it is: with its model card
            atomic_write(written / "README.md", model_card(fmt, vcfg, state, settings, ema))
        bar.set_postfix_str("done", refresh=False)
        bar.update(1)
    return written


def check_destination(dest: Path, folder: bool) -> None:
    """A ConfigError unless `dest` can take the export: a `.safetensors` file name (timm and our loaders tell the
    format by the suffix), or for `folder` (hf, timm-dir) a folder; either where this process can write."""
    if why := output_problem(dest, "--out", folder):
        raise ConfigError(why + (f", e.g. {dest / 'model.safetensors'}" if dest.is_dir() else ""))
    if not folder and dest.suffix != ".safetensors":
        raise ConfigError(f"--out {dest}: the file is safetensors, and timm and vitscale tell the format by the "
                          f"suffix; name it {dest.with_suffix('.safetensors').name}")


def load_eval_model(path: str | Path, image_size=None, mode: str = "bicubic") -> tuple[VisionTransformer,
                                                                                       EvalSettings]:
    """The model with its own head from a weight file or a run dir (its latest checkpoint), at `image_size`
    (position embeddings resampled when it differs), with the eval settings it was saved with."""
    path = Path(path)
    sd, src, settings = read_weights(path)
    if src.num_classes <= 0 or "head.weight" not in sd:
        raise ConfigError(f"{path} has no classification head to evaluate")
    try:
        dst = src.replace(image_size=image_size) if image_size else src
    except ValueError as err:  # not a multiple of the patch, or not positive
        raise ConfigError(f"model.image_size={image_size}: {err}") from err
    model = VisionTransformer(dst)
    model.load_state_dict(adapt_pos_embed(sd, src, dst, mode=mode), strict=True)
    if image_size:
        settings = settings.replace(image_size=dst.image_hw)
    return model, settings


def read_weights(path: str | Path, verb: str = "eval") -> tuple[dict[str, torch.Tensor], ViTConfig, EvalSettings]:
    """(state dict, config, eval settings) of a weight file or folder (any format vit.interop reads; foreign ones
    without our metadata get the default settings) or of a run dir (its latest checkpoint, the EMA weights where
    those were evaluated)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no weight file or run dir at {path}")
    if path.is_dir() and not identify_weights(path).loadable:  # not a transformers or timm model folder
        sd, cfg, state = consolidate(path, ema=bool(state_ema(path)))
        return sd, cfg, EvalSettings.from_dict(state["eval_settings"])
    try:
        ckpt = read_any(path)
    except ValueError as e:
        raise ConfigError(f"{e} ({verb} takes a weight file or a run dir)") from e
    return ckpt.state_dict, ckpt.config, ckpt.eval_settings or EvalSettings(image_size=ckpt.config.image_hw)


def state_ema(run_dir: Path) -> bool:
    """Whether a run dir's latest checkpoint evaluated EMA weights (what its reported top-1 measured)."""
    _, _, state = _checkpoint(run_dir, None)
    return bool(state.get("evaluated_ema"))
