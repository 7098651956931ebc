"""Training throughput: the core's DeepSpeed backend against a plain timm loop of the same ViT, in the same run.

    python bench/train_throughput.py --variant L/16 --micro-batch 128 --zero 1 --compile      (one GPU)
    python bench/train_throughput.py --variant debug --micro-batch 32 --steps 10              (CPU check)

Synthetic uint8 batches (so the input pipeline is not measured), normalised on the device as in
training. The reference is timm's VisionTransformer with the same width/depth/heads, bf16 autocast,
AdamW (fused on GPU), clip 1.0, torch.compile when --compile. Prints img/s, MFU, peak memory, and the
ratio ours / timm last.
"""

from __future__ import annotations

import argparse
import time

import torch

from data_prep.stream import normalize
from pretrain.config import load_pretrain_config
from runtime.dist import detect, init_distributed
from runtime.meters import peak_flops
from trainer.backend_deepspeed import DeepSpeedBackend
from trainer.loss import classification_loss
from trainer.optim import param_groups
from vit import VisionTransformer, train_flops_per_image, vit_config


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step_fn, steps: int, warmup: int) -> float:
    """Median seconds per step after `warmup` steps."""
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        step_fn()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def ours(args, vcfg, batch) -> float:
    overrides = [f"model.variant={args.variant}", f"model.image_size={vcfg.image_hw[0]}", "data.path=synthetic",
                 "run.dir=/tmp/bench", f"train.global_batch={args.micro_batch}",
                 f"train.micro_batch={args.micro_batch}",
                 f"zero.stage={args.zero}", "precision=bf16", f"model.compile={str(args.compile).lower()}",
                 "train.steps=1000", "optim.warmup_steps=1"]
    cfg = load_pretrain_config("debug_cpu", overrides)
    env = init_distributed(detect(), single=True)
    model = VisionTransformer(vcfg)
    backend = DeepSpeedBackend(model, param_groups(model, cfg.optim.weight_decay), cfg, env)
    images, labels = batch

    def step() -> None:  # the trainer's micro-step at accumulation 1: every call is a boundary
        backend.set_lr(cfg.optim.lr)
        backend.micro_step(normalize(images, dtype=backend.input_dtype, device=backend.device),
                           labels.to(backend.device), lambda logits, y: classification_loss(logits, y, "softmax", 0.0),
                           boundary=True)

    return _time(step, args.steps, args.warmup)


def timm_loop(args, vcfg, batch) -> float:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = TimmViT(img_size=vcfg.image_hw, patch_size=vcfg.patch_size, embed_dim=vcfg.width, depth=vcfg.depth,
                    num_heads=vcfg.heads, mlp_ratio=vcfg.mlp_ratio, num_classes=vcfg.num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if args.compile else model
    images, labels = batch

    def step() -> None:
        x = normalize(images, dtype=torch.float32, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(fwd(x).float(), labels.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, args.steps, args.warmup)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="L/16")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=128)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    vcfg = vit_config(args.variant, **({"image_size": args.image_size} if args.image_size else {}))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (args.micro_batch, 3, *vcfg.image_hw), dtype=torch.uint8, generator=g),
             torch.randint(0, vcfg.num_classes, (args.micro_batch,), generator=g))
    if torch.cuda.is_available():
        batch = (batch[0].pin_memory(), batch[1].pin_memory())
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(name)
    flops = train_flops_per_image(vcfg)
    rows = []
    for label, fn in (("vitscale DeepSpeed", ours), ("timm loop", timm_loop)):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sec = fn(args, vcfg, batch)
        ips = args.micro_batch / sec
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        mfu = f"{ips * flops / peak:.1%}" if peak else "n/a"
        rows.append(ips)
        print(f"{label:<20} {args.variant} @{vcfg.image_hw[0]} mb {args.micro_batch} zero {args.zero} "
              f"compile {args.compile}: {ips:8.1f} img/s  MFU {mfu}  peak {mem:.1f} GiB  ({name})", flush=True)
    print(f"ratio ours/timm: {rows[0] / rows[1]:.2f}")


if __name__ == "__main__":
    main()
