"""The fine-tuning loop on Accelerate: one process, several GPUs or several nodes (torchrun / accelerate launch).

    cfg = load_finetune_config("vit_l16_384", ["init=export/model.safetensors", "data.path=...", "run.dir=..."])
    report = train(cfg)

Each optimizer step accumulates `global_batch / (micro_batch * world)` micro-batches. Evaluation (top-1/top-5
at the fine-tuning resolution, eval transform) and checkpoints happen at epoch ends (or every N steps);
the evaluated weights (the EMA when enabled) are kept as last.safetensors and, when top-1 improves,
best.safetensors. A killed run started again with the same command resumes from checkpoints/latest.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from data_prep.stream import build_loader
from finetune import checkpoint as ckpt
from finetune.config import FinetuneConfig
from finetune.load import build_finetune_model, export_run_dir, finetune_config, read_checkpoint
from finetune.optim import EMA, build_optimizer, lr_at
from finetune.steps import evaluate, micro_step
from runtime.config import config_hash, save_config, to_dict
from runtime.dist import DistEnv, accumulation_steps, detect
from runtime.io import atomic_write_json
from runtime.logs import TBWriter, setup_logging
from runtime.meters import ThroughputMeter, peak_flops
from vit.config import vit_config
from vit.flops import train_flops_per_image
from vit.weights import save_weights


def make_accelerator(cfg: FinetuneConfig, accum: int, world: int):
    """An Accelerator for the recipe: plain data parallel, or Accelerate's DeepSpeed plugin with ZeRO-2."""
    from accelerate import Accelerator, DeepSpeedPlugin

    precision = {"fp32": "no"}.get(cfg.precision, cfg.precision)
    plugin = None
    if cfg.deepspeed.zero_stage:
        plugin = DeepSpeedPlugin(hf_ds_config={
            "train_micro_batch_size_per_gpu": cfg.train.micro_batch, "gradient_accumulation_steps": accum,
            "train_batch_size": cfg.train.global_batch, "gradient_clipping": cfg.optim.clip,
            "zero_optimization": {"stage": cfg.deepspeed.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                                  "offload_optimizer": {"device": "cpu" if cfg.deepspeed.offload_optimizer else "none"}},
            "bf16": {"enabled": cfg.precision == "bf16"}, "fp16": {"enabled": cfg.precision == "fp16"}})
    try:
        acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accum, deepspeed_plugin=plugin,
                          step_scheduler_with_optimizer=False)
    except Exception as e:  # importlib.metadata.PackageNotFoundError: transformers
        if plugin is not None and "transformers" in str(e):
            raise RuntimeError("deepspeed.zero_stage=2 uses Accelerate's DeepSpeed plugin, which needs the "
                               "`transformers` package: pip install transformers (or use deepspeed.zero_stage=0)") from e
        raise
    return acc


def dataset_classes(path: str) -> list[str] | None:
    """Class names from a dataset.json (or its folder), None for other sources."""
    p = Path(path)
    p = p / "dataset.json" if p.is_dir() else p
    if p.suffix == ".json" and p.is_file():
        return list(json.loads(p.read_text()).get("classes", [])) or None
    return None


def resolve_init(cfg: FinetuneConfig, accelerator) -> Path:
    """The weight file to start from; a pretrain run dir is exported once per node into the run dir."""
    src = Path(cfg.init)
    if not src.is_dir():
        return src
    out = Path(cfg.run.dir) / "init" / "model.safetensors"
    with accelerator.local_main_process_first():
        if accelerator.is_local_main_process and not out.is_file():
            export_run_dir(src, out)
    return out


@dataclass
class Setup:
    """Everything the loop needs, built once."""

    env: DistEnv
    accum: int
    total_steps: int
    num_classes: int
    class_names: list[str]
    vcfg: object
    input_dtype: torch.dtype


def _build(cfg: FinetuneConfig, env: DistEnv, accelerator, log):
    classes = dataset_classes(cfg.data.path)
    num_classes = cfg.data.num_classes or (len(classes) if classes else 0)
    if not num_classes:
        raise ValueError(f"cannot tell the number of classes of {cfg.data.path}: set data.num_classes")
    init = resolve_init(cfg, accelerator)
    heads = vit_config(cfg.model.variant).heads if cfg.model.variant else None
    sd, src, _ = read_checkpoint(init, heads=heads)
    vcfg = finetune_config(src, image_size=cfg.model.image_size, num_classes=num_classes, variant=cfg.model.variant,
                           dropout=cfg.model.dropout, drop_path=cfg.model.drop_path)
    net = build_finetune_model(sd, src, vcfg, mode=cfg.model.pos_interp)
    net.set_grad_checkpointing(cfg.model.grad_checkpointing)
    log.info(f"init {cfg.init}: grid {src.grid} -> {vcfg.grid} ({cfg.model.pos_interp}), "
             f"new head for {num_classes} classes")
    d = cfg.data
    common = dict(image_size=vcfg.image_hw, dist_env=env, workers=d.workers, seed=cfg.run.seed,
                  decode=d.decode, crop_pct=d.crop_pct, device=accelerator.device)
    train_loader = build_loader(d.path, d.train_split, train=True, global_batch=cfg.train.global_batch,
                                micro_batch=cfg.train.micro_batch, samples_per_epoch=d.samples_per_epoch,
                                resampled=d.resampled, scale=d.scale, ratio=d.ratio, hflip=d.hflip,
                                randaugment=d.randaugment, **common)
    eval_loader = None
    if d.val_split:
        mb = cfg.eval.micro_batch or cfg.train.micro_batch
        eval_loader = build_loader(d.path, d.val_split, train=False, global_batch=mb * env.world_size,
                                   micro_batch=mb, **common)
    t = cfg.train
    spe = train_loader.steps_per_epoch
    total = t.steps if t.steps is not None else (
        math.ceil(t.epochs * spe) if t.epochs is not None else t.samples // t.global_batch)
    return net, vcfg, num_classes, classes or [str(i) for i in range(num_classes)], train_loader, eval_loader, total


def train(cfg: FinetuneConfig) -> dict:
    """Fine-tune as `cfg` says; returns the report also written to run.dir/report.json."""
    env = detect()
    accum = accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, env.world_size)
    accelerator = make_accelerator(cfg, accum, env.world_size)
    run_dir = Path(cfg.run.dir)
    log = setup_logging(env, run_dir)
    torch.manual_seed(cfg.run.seed)
    net, vcfg, num_classes, names, train_loader, eval_loader, total = _build(cfg, env, accelerator, log)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
    model = torch.compile(net) if cfg.model.compile else net
    optimizer = build_optimizer(net.to(accelerator.device), cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    input_dtype = next(net.parameters()).dtype  # bf16 under DeepSpeed bf16 (no autocast there), else fp32
    ema = EMA(net, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    state = {"step": 0, "epoch": 0, "evals": [], "best_top1": -1.0, "config_hash": config_hash(cfg)}
    tag = ckpt.latest_tag(run_dir) if cfg.run.resume else None
    if tag:
        state, ema_sd = ckpt.load_checkpoint(accelerator, run_dir, tag)
        train_loader.load_state_dict(state["stream"])
        if ema is not None and ema_sd is not None:
            ema.load_state_dict(ema_sd, state["ema_updates"])
        if state["config_hash"] != config_hash(cfg):
            log.warning("resuming with a changed recipe (config hash differs from the checkpoint's)")
        log.info(f"resumed from {tag}: step {state['step']}, epoch {state['epoch']}")
    tb = TBWriter(run_dir / "tb", enabled=env.is_main)
    dev_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meter = ThroughputMeter(train_flops_per_image(vcfg), env.world_size, peak_flops(dev_name, cfg.log.peak_tflops))

    def weights() -> dict:
        return ema.state_dict() if ema is not None else net.state_dict()

    def run_eval() -> None:
        m = evaluate(net, eval_loader, accelerator.device, autocast=accelerator.autocast, input_dtype=input_dtype) \
            if ema is None else _eval_ema(net, ema, eval_loader, accelerator, input_dtype)
        m.update(step=state["step"], epoch=state["epoch"])
        state["evals"].append(m)
        tb.scalars({"eval/top1": m["top1"], "eval/top5": m["top5"], "eval/loss": m["loss"]}, state["step"])
        log.info(f"eval step {state['step']}: top-1 {m['top1']:.2%} top-5 {m['top5']:.2%} ({m['samples']} images)")
        if env.is_main:
            sd = ckpt.float_state(weights())
            save_weights(run_dir / "last.safetensors", sd, vcfg, names, state["step"])
            if m["top1"] > state["best_top1"]:
                state["best_top1"] = m["top1"]
                save_weights(run_dir / "best.safetensors", sd, vcfg, names, state["step"])

    def save() -> None:
        state["stream"] = train_loader.state_dict()
        state["ema_updates"] = ema.updates if ema is not None else 0
        ckpt.save_checkpoint(accelerator, run_dir, state, ema.state_dict() if ema is not None else None,
                             cfg.checkpoint.keep, env.is_main)

    t, o = cfg.train, cfg.optim
    loss_sum, loss_n, last_eval, last_save = None, 0, -1, -1
    log.info(f"fine-tuning {total} steps of {t.global_batch} images ({accum} x {t.micro_batch} x {env.world_size}), "
             f"{train_loader.steps_per_epoch} steps per epoch, {vcfg.image_hw} px")
    model.train()
    while state["step"] < total:
        meter.start_wait()
        for images, labels in train_loader:
            meter.end_wait()
            loss = micro_step(accelerator, model, optimizer, images, labels, num_classes=num_classes,
                              lr=lr_at(state["step"], total, o), clip=o.clip, label_smoothing=t.label_smoothing,
                              mixup=t.mixup, cutmix=t.cutmix, input_dtype=input_dtype)
            loss_sum, loss_n = (loss if loss_sum is None else loss_sum + loss), loss_n + 1
            if accelerator.sync_gradients:
                state["step"] += 1
                meter.end_step(t.global_batch)
                if ema is not None:
                    ema.update(net)
                if state["step"] % cfg.log.every == 0 or state["step"] == total:
                    s, lr = meter.summary(), lr_at(state["step"] - 1, total, o)
                    mean = (loss_sum / loss_n).item()
                    loss_sum, loss_n = None, 0
                    tb.scalars({"train/loss": mean, "train/lr": lr, "perf/img_per_s": s["img_per_s"],
                                "perf/mfu": s["mfu"], "perf/data_wait_share": s["data_wait_share"]}, state["step"])
                    log.info(f"step {state['step']}/{total} loss {mean:.4f} lr {lr:.2e} | {s['img_per_s']:.0f} img/s")
                if eval_loader is not None and cfg.eval.every and state["step"] % cfg.eval.every == 0:
                    run_eval()
                    last_eval = state["step"]
                if cfg.checkpoint.every and state["step"] % cfg.checkpoint.every == 0:
                    save()
                    last_save = state["step"]
                if state["step"] >= total:
                    break
            meter.start_wait()
        else:  # the epoch ran out
            state["epoch"] += 1
            if eval_loader is not None and not cfg.eval.every and last_eval != state["step"]:
                run_eval()
                last_eval = state["step"]
            if not cfg.checkpoint.every and last_save != state["step"] and state["step"] < total:
                save()
                last_save = state["step"]
    if eval_loader is not None and last_eval != state["step"]:
        run_eval()
    if last_save != state["step"]:
        save()
    report = _report(cfg, vcfg, state, total, env)
    if env.is_main:
        if eval_loader is None:
            save_weights(run_dir / "last.safetensors", ckpt.float_state(weights()), vcfg, names, state["step"])
        atomic_write_json(run_dir / "report.json", report)
    tb.close()
    accelerator.end_training()
    return report


def _eval_ema(net, ema: EMA, loader, accelerator, input_dtype) -> dict:
    """Evaluate the EMA weights (swapped in, then swapped back) and the raw weights' top-1 alongside."""
    raw = evaluate(net, loader, accelerator.device, autocast=accelerator.autocast, input_dtype=input_dtype)
    backup = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.to(backup[k].dtype) for k, v in ema.state_dict().items()})
    m = evaluate(net, loader, accelerator.device, autocast=accelerator.autocast, input_dtype=input_dtype)
    net.load_state_dict(backup)
    m["raw_top1"] = raw["top1"]
    return m


def _report(cfg: FinetuneConfig, vcfg, state: dict, total: int, env: DistEnv) -> dict:
    evals = state["evals"]
    best = max(evals, key=lambda m: m["top1"]) if evals else None
    return {"init": cfg.init, "image_size": list(vcfg.image_hw), "grid": list(vcfg.grid), "steps": state["step"],
            "total_steps": total, "epochs": state["epoch"], "world_size": env.world_size,
            "weights": "ema" if cfg.train.ema_decay > 0 else "model", "best": best,
            "last": evals[-1] if evals else None, "evals": evals, "config": to_dict(cfg)}


def evaluate_weights(path: str, data_path: str, split: str, image_size, micro_batch: int, workers: int,
                     crop_pct: float, mode: str = "bicubic") -> dict:
    """`finetune eval`: top-1/top-5 of a weight file on a split at `image_size` (one process or torchrun)."""
    from finetune.load import load_for_eval
    from runtime.dist import init_distributed

    env = init_distributed(detect())
    dev = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        src = export_run_dir(path, Path(tmp) / "model.safetensors") if Path(path).is_dir() else path
        model, _ = load_for_eval(src, image_size or None, mode=mode)
    model.to(dev)
    loader = build_loader(data_path, split, train=False, image_size=model.cfg.image_hw, global_batch=micro_batch *
                          env.world_size, micro_batch=micro_batch, dist_env=env, workers=workers, seed=0,
                          crop_pct=crop_pct, device=dev)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else None
    m = evaluate(model, loader, dev, autocast=amp)
    m.update(weights=str(path), image_size=list(model.cfg.image_hw), split=split)
    return m
