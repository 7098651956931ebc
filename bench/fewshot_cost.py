"""What few-shot eval every N steps adds to pre-training, measured (trainer/fewshot.py; issue #17).

    python bench/fewshot_cost.py                                  (B/16 at 224 px, the L/16 recipe's schedule)
    python bench/fewshot_cost.py --variant L/16 --micro-batch 32  (GPU: the recipe's model)
    python bench/fewshot_cost.py --variant debug --image-size 32 --micro-batch 32    (seconds, a smoke run)

A few-shot eval is (a) one no-grad forward per image of the downstream train and val splits, through the real
`extract_features` (hook on the head, key-sorted gather), (b) the ridge fits on the host: every seed, shot
count and l2 of the grid, and (c) decoding those images in the loader workers (the stream's own eval decode
of a 500x375 JPEG, ImageNet's typical size; split over ranks x workers; the GPU waits for it). A training
step is forward + backward + AdamW over `global_batch` images.
(a) and the training step are both the model's matmuls, so their ratio measured here carries over to the GPU
(a forward is ~1/3 of a training image on any device); (b) runs on the host in training too, so its seconds
are measured as they are, at the recipe's feature width and the datasets' sizes, and set against the GPU
interval at the throughput given by --gpu-img-per-s; so are (c)'s. Prints each part and the overhead share.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.fewshot import extract_features, fewshot_top1  # noqa: E402
from vit import VisionTransformer, vit_config  # noqa: E402

# big_vision's few-shot datasets (train, val, classes): what `eval.fewshot.datasets` would typically hold
DATASETS = {"cifar100": (50_000, 10_000, 100), "pets": (3_680, 3_669, 37), "dtd": (3_760, 1_880, 47),
            "caltech101": (3_060, 6_084, 102)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _per_image(fn, batch: int, reps: int) -> float:
    fn()  # warm-up (allocations, kernels)
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / (reps * batch)


def measure_model(variant: str, image_size: int, micro_batch: int, reps: int) -> tuple[float, float]:
    """(seconds per training image, seconds per few-shot feature image) of one model on this machine (the GPU
    when there is one, under bf16 autocast there)."""
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = vit_config(variant, image_size=image_size, num_classes=1000)
    model = VisionTransformer(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(micro_batch, 3, image_size, image_size, device=dev)
    y = torch.randint(0, 1000, (micro_batch,), device=dev)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext

    def train_step() -> None:
        model.train()
        with amp():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches = [(torch.randint(0, 256, (micro_batch, 3, image_size, image_size), dtype=torch.uint8),
                torch.arange(micro_batch), [f"{i:06d}" for i in range(micro_batch)])]
    t_train = _per_image(train_step, micro_batch, reps)
    t_feat = _per_image(lambda: extract_features(model, model.head, batches, dev, context=amp), micro_batch, reps)
    return t_train, t_feat


def measure_decode(image_size: int, reps: int = 50) -> float:
    """Seconds to decode, resize and centre-crop one 500x375 JPEG as the eval stream does (one worker)."""
    from PIL import Image

    from data_prep.transforms import center_crop_box, crop_resize_pil

    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG", quality=90)
    data, size = buf.getvalue(), (image_size, image_size)
    box = center_crop_box(500, 375, size)
    t0 = time.perf_counter()
    for _ in range(reps):
        crop_resize_pil(data, box, size, False)
    return (time.perf_counter() - t0) / reps


def measure_solve(width: int, train: int, val: int, classes: int, shots: list[int], seeds: int) -> float:
    """Seconds of the ridge fits of one dataset (every seed, shot count, l2) on random features of `width`."""
    g = torch.Generator().manual_seed(0)
    tr = (torch.randn(train, width, generator=g), torch.randint(0, classes, (train,), generator=g))
    va = (torch.randn(val, width, generator=g), torch.randint(0, classes, (val,), generator=g))
    t0 = time.perf_counter()
    fewshot_top1(tr, va, classes, shots, seeds, holdout=2)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="B/16", help="model whose forward/train ratio is measured (default B/16)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--every", type=int, default=5000, help="steps between few-shot evals (vit_l16_in21k: eval.every)")
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--width", type=int, default=1024, help="feature width (L/16's pre-logits: 1024)")
    p.add_argument("--datasets", default="cifar100,pets", help=f"of {', '.join(DATASETS)}")
    p.add_argument("--shots", default="1,5,10,25")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--gpu-img-per-s", type=float, default=8 * 600.0,
                   help="pre-training throughput of the job, images/s (default: 8 GPUs x 600, L/16 bf16 on A100)")
    p.add_argument("--ranks", type=int, default=8, help="GPUs of the job (the few-shot images are split over them)")
    p.add_argument("--workers", type=int, default=10, help="loader workers per rank (vit_l16_in21k: data.workers)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_train, t_feat = measure_model(args.variant, args.image_size, args.micro_batch, args.reps)
    names = args.datasets.split(",")
    shots = [int(s) for s in args.shots.split(",")]
    images = sum(DATASETS[n][0] + DATASETS[n][1] for n in names)
    solve = sum(measure_solve(args.width, *DATASETS[n], shots, args.seeds) for n in names)
    interval_images = args.every * args.global_batch
    feat_share = images * t_feat / (interval_images * t_train)  # device time: ratio carries over
    interval_s = interval_images / args.gpu_img_per_s
    solve_share = solve / interval_s
    decode = images * measure_decode(args.image_size) / (args.ranks * args.workers)
    decode_share = decode / interval_s
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.variant} @ {args.image_size} px on {where}: training "
          f"{t_train * 1e3:.1f} ms/image, few-shot features {t_feat * 1e3:.1f} ms/image "
          f"(ratio {t_feat / t_train:.2f})")
    print(f"few-shot every {args.every} steps x {args.global_batch} = {interval_images:,} training images; "
          f"datasets {', '.join(names)}: {images:,} feature images ({feat_share:.3%} of the interval's device time)")
    print(f"ridge fits ({len(shots)} shot counts x {args.seeds} seeds x 13 l2, width {args.width}): {solve:.1f} s on "
          f"the host = {solve_share:.3%} of the interval at {args.gpu_img_per_s:.0f} img/s ({interval_s / 60:.0f} min)")
    print(f"decoding {images:,} JPEGs (500x375) over {args.ranks} ranks x {args.workers} workers: {decode:.1f} s = "
          f"{decode_share:.3%} of the interval")
    total = feat_share + solve_share + decode_share
    print(f"overhead: {total:.2%} of pre-training wall time (target < 3 %: {'met' if total < 0.03 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
