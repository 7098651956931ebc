"""Fine-tuning step throughput: vitscale's fine-tune step (Accelerate, SDPA, fused optimizer, optional compile)
against a plain timm loop, same model size, resolution, micro-batch, optimizer and compile setting, in the same
run (both compiled on a GPU by default, so the ratio measures the loop, not torch.compile).

    python bench/finetune_throughput.py          # GPU: L/16 @ 384, micro-batch 32 (anchor: timm 293 img/s, H200)
    python bench/finetune_throughput.py --variant debug --image-size 32 --micro-batch 8 --steps 4   # CPU check

Prints one JSON line per measurement; the ratio (ours / timm) is the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from data_prep.stream import normalize
from finetune.config import load_finetune_config
from finetune.load import build_finetune_model, finetune_config
from runtime.dist import detect
from runtime.meters import matmul_tflops, mfu_text, peak_flops
from trainer.backend_accelerate import AccelerateBackend
from trainer.loss import classification_loss
from trainer.optim import param_groups
from vit import VisionTransformer, vit_config
from vit.flops import train_flops_per_image

TIMM_NAMES = {"L/16": "vit_large_patch16_384", "B/16": "vit_base_patch16_384", "H/14": "vit_huge_patch14_224"}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step, warmup: int, steps: int) -> float:
    """Median seconds per step after `warmup` untimed steps."""
    for _ in range(warmup):
        step()
    _sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_ours(args, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Our fine-tune step: a checkpoint loaded at the new resolution, the core's Accelerate backend in bf16."""
    wd = 0.0 if args.optim == "sgd" else 0.05
    cfg = load_finetune_config("debug_cpu", ["init=unused", "data.path=unused", "run.dir=unused",
                                             f"train.global_batch={args.micro_batch}",
                                             f"train.micro_batch={args.micro_batch}", f"optim.name={args.optim}",
                                             f"optim.weight_decay={wd}", f"model.compile={str(args.compile).lower()}",
                                             "precision=bf16"])
    src = vit_config(args.variant, image_size=args.pretrain_size, num_classes=1000, representation_size=None)
    sd = VisionTransformer(src).state_dict()
    dst = finetune_config(src, image_size=args.image_size, num_classes=1000)
    net = build_finetune_model(sd, src, dst)
    backend = AccelerateBackend(net, param_groups(net, wd), cfg, detect())
    backend.module.train()

    def step() -> None:  # the trainer's micro-step at accumulation 1: every call is a boundary
        backend.set_lr(1e-4)
        x = normalize(images, dtype=backend.input_dtype, device=backend.device)
        backend.micro_step(x, labels.to(backend.device), lambda logits, y: classification_loss(logits, y, "softmax",
                                                                                               0.0), boundary=True)

    return _time(step, args.warmup, args.steps)


def bench_timm(args, images: torch.Tensor, labels: torch.Tensor) -> float:
    """timm's ViT in a plain loop: bf16 autocast, the same optimizer (fused on GPU), clip 1, compiled as ours."""
    import timm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = vit_config(args.variant)
    if args.variant in TIMM_NAMES:
        model = timm.create_model(TIMM_NAMES[args.variant], pretrained=False, img_size=args.image_size,
                                  num_classes=1000)
    else:
        model = timm.models.vision_transformer.VisionTransformer(
            img_size=args.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
            num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, num_classes=1000)
    model.to(dev).train()
    fused = dev == "cuda" or None
    opt = (torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, fused=fused) if args.optim == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused))
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255

    fwd = torch.compile(model) if args.compile else model

    def step() -> None:
        x = (images.to(dev).float() - mean) / std
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x).float(), labels.to(dev))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _time(step, args.warmup, args.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="L/16")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--pretrain-size", type=int, default=None,
                   help="checkpoint resolution (default: image size * 224 / 384)")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--optim", choices=["adamw", "sgd"], default="adamw", help="adamw: as the timm anchor")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available())
    args = p.parse_args()
    patch = vit_config(args.variant).patch_size
    args.pretrain_size = args.pretrain_size or max(patch, args.image_size * 224 // 384 // patch * patch)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shape = (args.micro_batch, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev)  # the loader's uint8 batches
    labels = torch.randint(0, 1000, (args.micro_batch,), device=dev)
    flops = train_flops_per_image(vit_config(args.variant, image_size=args.image_size, num_classes=1000))
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    peak, measured = peak_flops(device), matmul_tflops()
    results = {}
    for name, fn in (("timm", bench_timm), ("vitscale_finetune", bench_ours)):
        t = fn(args, images, labels)
        results[name] = args.micro_batch / t
        print(json.dumps({"what": name, "variant": args.variant, "px": args.image_size, "micro_batch": args.micro_batch,
                          "optim": args.optim, "compile": args.compile, "device": device,
                          "step_s": round(t, 4), "img_per_s": round(results[name], 2),
                          "achieved_tflops": round(results[name] * flops / 1e12, 2),
                          "mfu": mfu_text(results[name], flops, peak, measured)}), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"ratio vitscale_finetune / timm: {results['vitscale_finetune'] / results['timm']:.2f}")


if __name__ == "__main__":
    main()
