"""Pre-training throughput at a recipe's own settings: the core's DeepSpeed backend against a compiled timm loop
of the same ViT with the same accumulation, in the same run.

    python bench/train_throughput.py --recipe vit_l16_in21k          (one GPU: the recipe's micro-batch, ZeRO auto,
                                                                       compile, accumulation global / micro)
    python bench/train_throughput.py --recipe vit_h14_in21k --accum 8
    python bench/train_throughput.py --recipe debug_cpu --steps 3    (CPU check)

Only the data source is replaced: synthetic uint8 batches, normalised on the device as in training. Everything
else is the recipe's: model, precision, ZeRO settings (`auto` resolved as at training), buckets, compile,
optimizer. The reference is timm's VisionTransformer with the same width/depth/heads/classes and the recipe's
dropout and drop-path rates (timm has no tanh pre-logits layer: width^2 weights less, under 0.4 % of L/16's
FLOPs), bf16 autocast, AdamW
(fused on GPU), clip 1.0, torch.compile when the recipe compiles, the same micro-batches per step. Prints
img/s, MFU against the card's dense bf16 peak and against the bf16 matmul rate measured in the same run, peak
memory, and the ratio ours / timm last.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import time

import torch

from data_prep.stream import normalize
from pretrain.config import load_pretrain_config
from pretrain.plan import gpu_memory_gib, resolve_zero
from pretrain.train import model_config
from runtime.dist import detect, init_distributed
from runtime.meters import matmul_tflops, mfu_text, peak_flops
from trainer.backend_deepspeed import DeepSpeedBackend
from trainer.loss import classification_loss
from trainer.optim import lr_at, param_groups
from vit import VisionTransformer, train_flops_per_image


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(step_fn, steps: int, warmup: int) -> float:
    """Median seconds per optimizer step after `warmup` steps."""
    times = []
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        step_fn()
        _sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# kernel (GPU) or operator (CPU) names -> what they do, first match wins
KINDS = (("matmul", r"gemm|cutlass|xmma|nvjet|cublas|aten::(addmm|mm|bmm|linear|matmul)"),
         ("attention", r"flash|fmha|attention|sdpa"),
         # a compiled kernel that draws a dropout mask also does the elementwise work fused with it (GELU, adds)
         ("fused with dropout", r"triton\w*(dropout|rand|philox)"), ("dropout", r"philox|rand|bernoulli|dropout"),
         ("optimizer", r"multi_tensor|adam|fused_adam"), ("all-reduce", r"nccl|all_?reduce|gloo"),
         ("copy", r"memcpy|memset|copy|to_copy"), ("convolution", r"conv"), ("fused (compiled)", r"triton"))


def kind_of(name: str) -> str:
    """The KINDS label of a kernel or operator name, "other" if none matches."""
    return next((k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")


def kernel_time(step_fn, steps: int = 2) -> dict[tuple[str, str], float]:
    """Milliseconds per optimizer step by (KINDS label, kernel name): the GPU kernels' own time on CUDA (the
    operators' own CPU time without a GPU), over `steps` profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step_fn()
        _sync()
    out: collections.Counter[tuple[str, str]] = collections.Counter()
    for e in prof.events():
        if cuda and e.device_type == DeviceType.CUDA:  # a kernel: its own duration
            out[kind_of(e.name), e.name] += e.device_time_total / 1e3 / steps
        elif not cuda and e.device_type == DeviceType.CPU:
            out[kind_of(e.name), e.name] += e.self_cpu_time_total / 1e3 / steps
    return dict(out)


def by_kind(ms: dict[tuple[str, str], float]) -> dict[str, float]:
    """kernel_time's figures summed by kind."""
    out: collections.Counter[str] = collections.Counter()
    for (kind, _), t in ms.items():
        out[kind] += t
    return dict(out)


def print_profile(ours_ms: dict, timm_ms: dict, wall_ms: list[float]) -> None:
    """Both loops' kernel time per step by kind, the step time no kernel ran (host work, launch gaps), and
    the kernels where ours spends the most more than timm's loop: where the next millisecond is."""
    ours_k, timm_k = by_kind(ours_ms), by_kind(timm_ms)
    print(f"{'kernel ms per step':<20} {'ours':>9} {'timm':>9}")
    for kind in sorted(set(ours_k) | set(timm_k), key=lambda k: -ours_k.get(k, 0.0)):
        print(f"{kind:<20} {ours_k.get(kind, 0.0):9.2f} {timm_k.get(kind, 0.0):9.2f}")
    total = sum(ours_k.values()), sum(timm_k.values())
    print(f"{'kernels, total':<20} {total[0]:9.2f} {total[1]:9.2f}")
    print(f"{'no kernel running':<20} {wall_ms[0] - total[0]:9.2f} {wall_ms[1] - total[1]:9.2f}")
    print(f"{'step (wall)':<20} {wall_ms[0]:9.2f} {wall_ms[1]:9.2f}")
    extra = sorted(((t - timm_ms.get(key, 0.0), key) for key, t in ours_ms.items()), reverse=True)[:5]
    for more, (kind, name) in extra:
        if more > 0.05:
            print(f"ours +{more:.2f} ms  {kind:<18} {name[:90]}")


def ours(cfg, vcfg, batch, accum: int, args) -> float:
    env = init_distributed(detect(), single=True)
    zero, line = resolve_zero(cfg, vcfg, 1, 1, gpu_memory_gib(0, 1))
    print(line or f"zero.stage={zero.stage} (the recipe's)", flush=True)
    run_cfg = dataclasses.replace(cfg, zero=zero)
    model = VisionTransformer(vcfg)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    backend = DeepSpeedBackend(model, param_groups(model, cfg.optim.weight_decay), run_cfg, env)
    images, labels = batch

    def loss_fn(logits, y):
        return classification_loss(logits, y, cfg.train.loss, cfg.train.label_smoothing)

    def step() -> None:  # one optimizer step: `accum` micro-steps, as the trainer's loop runs them
        backend.set_lr(lr_at(10**6, 10**7, cfg.optim))
        for i in range(accum):
            x = normalize(images, dtype=backend.input_dtype, device=backend.device)
            backend.micro_step(x, labels.to(backend.device, non_blocking=True), loss_fn, boundary=i == accum - 1)

    return _profiled(step, args)


def _profiled(step, args) -> float:
    """Median seconds per step; with --profile also the kernels' time per step by kind (after the timing)."""
    seconds = _time(step, args.steps, args.warmup)
    if args.profile:
        try:
            args.kernel_ms.append(kernel_time(step))
        except Exception as err:  # the profile must not cost the timing above (another torch's profiler API)
            print(f"profile failed: {err!r}", flush=True)
            args.kernel_ms.append({})
    return seconds


def timm_loop(cfg, vcfg, batch, accum: int, args) -> float:
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the recipe's regularisation too: dropout (the ViT paper's 0.1 in pre-training) costs a random mask per
    # activation it touches, so a peer without it would be timed on less work
    model = TimmViT(img_size=vcfg.image_hw, patch_size=vcfg.patch_size, embed_dim=vcfg.width, depth=vcfg.depth,
                    num_heads=vcfg.heads, mlp_ratio=vcfg.mlp_ratio, num_classes=vcfg.num_classes,
                    drop_rate=vcfg.dropout, proj_drop_rate=vcfg.dropout, attn_drop_rate=vcfg.attn_dropout,
                    drop_path_rate=vcfg.drop_path).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if cfg.model.compile else model
    images, labels = batch

    def step() -> None:
        for _ in range(accum):
            x = normalize(images, dtype=torch.float32, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(fwd(x).float(), labels.to(device)) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _profiled(step, args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="vit_l16_in21k")
    p.add_argument("--accum", type=int, default=None, help="micro-batches per step (default: the recipe's on 1 GPU)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also each loop's kernel time per step by kind")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.micro_batch=64")
    args = p.parse_args()
    args.kernel_ms = []
    cfg = load_pretrain_config(args.recipe, ["data.path=synthetic", "run.dir=/tmp/bench", *args.overrides])
    accum = args.accum or cfg.train.global_batch // cfg.train.micro_batch
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch=accum * cfg.train.micro_batch))
    vcfg = model_config(cfg, cfg.data.num_classes or 21843)
    mb = cfg.train.micro_batch
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (mb, 3, *vcfg.image_hw), dtype=torch.uint8, generator=g),
             torch.randint(0, vcfg.num_classes, (mb,), generator=g))
    if torch.cuda.is_available():
        batch = (batch[0].pin_memory(), batch[1].pin_memory())
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak, measured = peak_flops(name), matmul_tflops()
    flops = train_flops_per_image(vcfg)
    rates = []
    for label, fn in (("vitscale DeepSpeed", ours), ("timm loop", timm_loop)):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ips = accum * mb / fn(cfg, vcfg, batch, accum, args)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        rates.append(ips)
        print(f"{label:<20} {args.recipe} ({cfg.model.variant} @{vcfg.image_hw[0]}) mb {mb} x accum {accum} "
              f"dropout {vcfg.dropout} compile {cfg.model.compile}: {ips:8.1f} img/s  "
              f"{mfu_text(ips, flops, peak, measured)}  peak {mem:.1f} GiB  ({name})", flush=True)
    if args.profile:
        print_profile(*args.kernel_ms, [accum * mb / r * 1e3 for r in rates])
    print(f"ratio ours/timm: {rates[0] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
