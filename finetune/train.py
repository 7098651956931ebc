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
from pathlib import Path

import torch

from data_prep.stream import DataCfg, build_loader
from finetune import checkpoint as ckpt
from finetune.config import FinetuneConfig
from finetune.load import build_finetune_model, export_run_dir, finetune_config, read_checkpoint
from finetune.optim import EMA, build_optimizer, lr_at
from finetune.steps import all_reduce_mean, evaluate, micro_step
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
            "zero_optimization": {
                "stage": cfg.deepspeed.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu" if cfg.deepspeed.offload_optimizer else "none"}},
            "bf16": {"enabled": cfg.precision == "bf16"}, "fp16": {"enabled": cfg.precision == "fp16"}})
    try:
        # cpu=True on a CPU-only machine: without it Accelerate starts no process group under torchrun there
        # and every rank would train alone (DistributedType.NO), silently.
        acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accum, deepspeed_plugin=plugin,
                          step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available())
    except Exception as e:  # importlib.metadata.PackageNotFoundError: transformers
        if plugin is not None and "transformers" in str(e):
            raise RuntimeError("deepspeed.zero_stage=2 uses Accelerate's DeepSpeed plugin, which needs the "
                               "`transformers` package: pip install transformers (or set deepspeed.zero_stage=0)"
                               ) from e
        raise
    if plugin is not None and acc.distributed_type.value != "DEEPSPEED":
        raise RuntimeError(f"deepspeed.zero_stage={cfg.deepspeed.zero_stage} asked for, but Accelerate runs "
                           f"{acc.distributed_type.value} here (its DeepSpeed plugin needs GPUs); use "
                           "deepspeed.zero_stage=0 on this machine")
    # The real process group, not Accelerate's rank fields (they misreport under its DeepSpeed plugin on CPU).
    got = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if got != world:
        raise RuntimeError(f"launched as {world} processes but Accelerate's process group has {got}: the ranks "
                           "would train apart; launch with torchrun or `accelerate launch`")
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
    common = dict(dist_env=env, image_size=vcfg.image_hw, seed=cfg.run.seed, device=accelerator.device)
    train_loader = build_loader(d, d.train_split, train=True, micro_batch=cfg.train.micro_batch,
                                global_batch=cfg.train.global_batch, **common)
    eval_loader = None
    if d.val_split:
        eval_loader = build_loader(d, d.val_split, train=False,
                                   micro_batch=cfg.eval.micro_batch or cfg.train.micro_batch, **common)
    t = cfg.train
    spe = train_loader.steps_per_epoch
    total = t.steps if t.steps is not None else (
        math.ceil(t.epochs * spe) if t.epochs is not None else t.samples // t.global_batch)
    return net, vcfg, num_classes, classes or [str(i) for i in range(num_classes)], train_loader, eval_loader, total


class Finetuner:
    """One fine-tuning run: built from a config, resumed if a checkpoint exists, then `fit()`."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg, self.env = cfg, detect()
        self.accum = accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, self.env.world_size)
        self.accelerator = make_accelerator(cfg, self.accum, self.env.world_size)
        self.run_dir = Path(cfg.run.dir)
        self.log = setup_logging(self.env, self.run_dir)
        torch.manual_seed(cfg.run.seed)
        (self.net, self.vcfg, self.num_classes, self.names, self.train_loader, self.eval_loader,
         self.total) = _build(cfg, self.env, self.accelerator, self.log)
        if self.env.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        model = torch.compile(self.net) if cfg.model.compile else self.net
        optimizer = build_optimizer(self.net.to(self.accelerator.device), cfg.optim)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.input_dtype = next(self.net.parameters()).dtype  # bf16 under DeepSpeed bf16 (no autocast), else fp32
        self.ema = EMA(self.net, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.state = {"step": 0, "epoch": 0, "evals": [], "best_top1": -1.0, "config_hash": config_hash(cfg)}
        self.tb = TBWriter(self.run_dir / "tb", enabled=self.env.is_main)
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        self.meter = ThroughputMeter(train_flops_per_image(self.vcfg), self.env.world_size,
                                     peak_flops(dev, cfg.log.peak_tflops))
        self.last_eval = self.last_save = -1
        if cfg.run.resume and (tag := ckpt.latest_tag(self.run_dir)):
            self.resume(tag)

    def resume(self, tag: str) -> None:
        self.state, ema_sd = ckpt.load_checkpoint(self.accelerator, self.run_dir, tag)
        self.train_loader.load_state_dict(self.state["stream"])
        if self.ema is not None and ema_sd is not None:
            self.ema.load_state_dict(ema_sd, self.state["ema_updates"])
        if self.state["config_hash"] != config_hash(self.cfg):
            self.log.warning("resuming with a changed recipe (config hash differs from the checkpoint's)")
        self.last_save = self.state["step"]
        self.last_eval = self.state["evals"][-1]["step"] if self.state["evals"] else -1
        self.log.info(f"resumed from {tag}: step {self.state['step']}, epoch {self.state['epoch']}")

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights that are evaluated and kept: the EMA when enabled."""
        return self.ema.state_dict() if self.ema is not None else self.net.state_dict()

    def run_eval(self) -> None:
        st, acc = self.state, self.accelerator
        kw = dict(autocast=acc.autocast, input_dtype=self.input_dtype)
        if self.ema is None:
            m = evaluate(self.net, self.eval_loader, acc.device, **kw)
        else:
            m = _eval_ema(self.net, self.ema, self.eval_loader, acc.device, **kw)
        m.update(step=st["step"], epoch=st["epoch"])
        st["evals"].append(m)
        self.last_eval = st["step"]
        self.tb.scalars({"eval/top1": m["top1"], "eval/top5": m["top5"], "eval/loss": m["loss"]}, st["step"])
        self.log.info(f"eval step {st['step']}: top-1 {m['top1']:.2%} top-5 {m['top5']:.2%} ({m['samples']} images)")
        if self.env.is_main:
            sd = ckpt.float_state(self.weights())
            save_weights(self.run_dir / "last.safetensors", sd, self.vcfg, self.names, st["step"])
            if m["top1"] > st["best_top1"]:
                st["best_top1"] = m["top1"]
                save_weights(self.run_dir / "best.safetensors", sd, self.vcfg, self.names, st["step"])

    def save(self) -> None:
        self.state["stream"] = self.train_loader.state_dict()
        self.state["ema_updates"] = self.ema.updates if self.ema is not None else 0
        ckpt.save_checkpoint(self.accelerator, self.run_dir, self.state,
                             self.ema.state_dict() if self.ema is not None else None,
                             self.cfg.checkpoint.keep, self.env.is_main)
        self.last_save = self.state["step"]

    def log_train(self, loss_sum: torch.Tensor, loss_n: int) -> None:
        step, s = self.state["step"], self.meter.summary()
        mean = all_reduce_mean(loss_sum.float() / loss_n).item()  # the global batch's loss, not rank 0's share
        lr = lr_at(step - 1, self.total, self.cfg.optim)
        self.tb.scalars({"train/loss": mean, "train/lr": lr, "perf/img_per_s": s["img_per_s"], "perf/mfu": s["mfu"],
                         "perf/data_wait_share": s["data_wait_share"]}, step)
        mfu = f" mfu {s['mfu']:.1%}" if s["mfu"] is not None else ""
        self.log.info(f"step {step}/{self.total} loss {mean:.4f} lr {lr:.2e} | {s['img_per_s']:.0f} img/s{mfu}")

    def after_step(self) -> None:
        """Bookkeeping after each optimizer step: EMA, epoch count, then eval and checkpoint when due."""
        st, c = self.state, self.cfg
        st["step"] += 1
        self.meter.end_step(c.train.global_batch)
        if self.ema is not None:
            self.ema.update(self.net)
        # Epochs come from the stream's own position, read right after the step: a run may stop (or be saved)
        # exactly at an epoch end. A position at the end counts as the next epoch (loaders that wrap lazily).
        pos = self.train_loader.state_dict()
        done = pos["epoch"] + int(pos["position"] >= len(self.train_loader))
        epoch_end, st["epoch"] = done > st["epoch"], done
        if self.eval_loader is not None and (st["step"] % c.eval.every == 0 if c.eval.every else epoch_end):
            self.run_eval()
        if (st["step"] % c.checkpoint.every == 0 if c.checkpoint.every else epoch_end) and st["step"] < self.total:
            self.save()

    def fit(self) -> dict:
        """Train to the end; returns the report also written to run.dir/report.json."""
        t, o, st = self.cfg.train, self.cfg.optim, self.state
        loss_sum, loss_n = None, 0
        self.log.info(f"fine-tuning {self.total} steps of {t.global_batch} images ({self.accum} x {t.micro_batch} x "
                      f"{self.env.world_size}), {self.train_loader.steps_per_epoch} steps per epoch, "
                      f"{self.vcfg.image_hw} px")
        self.model.train()
        while st["step"] < self.total:
            self.meter.start_wait()
            for images, labels in self.train_loader:
                self.meter.end_wait()
                loss = micro_step(self.accelerator, self.model, self.optimizer, images, labels,
                                  num_classes=self.num_classes, lr=lr_at(st["step"], self.total, o), clip=o.clip,
                                  label_smoothing=t.label_smoothing, mixup=t.mixup, cutmix=t.cutmix,
                                  input_dtype=self.input_dtype)
                loss_sum, loss_n = (loss if loss_sum is None else loss_sum + loss), loss_n + 1
                if self.accelerator.sync_gradients:
                    self.after_step()
                    if st["step"] % self.cfg.log.every == 0 or st["step"] == self.total:
                        self.log_train(loss_sum, loss_n)
                        loss_sum, loss_n = None, 0
                    if st["step"] >= self.total:
                        break
                self.meter.start_wait()
        return self.finish()

    def finish(self) -> dict:
        st = self.state
        if self.eval_loader is not None and self.last_eval != st["step"]:
            self.run_eval()
        if self.last_save != st["step"]:
            self.save()
        report = _report(self.cfg, self.vcfg, st, self.total, self.env)
        if self.env.is_main:
            if self.eval_loader is None:
                save_weights(self.run_dir / "last.safetensors", ckpt.float_state(self.weights()), self.vcfg,
                             self.names, st["step"])
            atomic_write_json(self.run_dir / "report.json", report)
        self.tb.close()
        self.accelerator.end_training()
        return report


def train(cfg: FinetuneConfig) -> dict:
    """Fine-tune as `cfg` says (resuming from run.dir/checkpoints/latest if there); returns the report."""
    return Finetuner(cfg).fit()


def _eval_ema(net, ema: EMA, loader, device, **kw) -> dict:
    """Evaluate the EMA weights (swapped in, then swapped back) and the raw weights' top-1 alongside."""
    raw = evaluate(net, loader, device, **kw)
    backup = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.to(backup[k].dtype) for k, v in ema.state_dict().items()})
    m = evaluate(net, loader, device, **kw)
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
    data = DataCfg(path=data_path, workers=workers, crop_pct=crop_pct)
    loader = build_loader(data, split, train=False, dist_env=env, image_size=model.cfg.image_hw,
                          micro_batch=micro_batch, seed=0, device=dev)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else None
    m = evaluate(model, loader, dev, autocast=amp)
    m.update(weights=str(path), image_size=list(model.cfg.image_hw), split=split)
    return m
