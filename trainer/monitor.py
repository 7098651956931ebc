"""The one console + tracker logger of both stages (rank 0 writes; every rank measures).

The loss is summed on the device and read only at log steps, so logging costs one host sync per `log.every`
steps. Both stages log the same tags: train/*, perf/*, eval/*, data/skipped_*, the first batch as an image
grid and the config as params, to every tracker of `log.trackers` (TensorBoard by default; trainer/trackers.py).
See docs/architecture.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

from runtime.config import ConfigError
from runtime.dist import DistEnv, main_decides
from runtime.logs import get_logger
from runtime.meters import ThroughputMeter, peak_flops
from runtime.progress import format_eta
from trainer.trackers import Tracker, flat_params, start_trackers
from vit import VisionTransformer, ViTConfig, train_flops_per_image


def image_grid(images: torch.Tensor, per_row: int = 8, pad: int = 2) -> torch.Tensor:
    """(N, C, H, W) images -> one (C, H', W') grid of `per_row` per row, `pad` zero pixels around each: the
    layout of torchvision's `make_grid` defaults, without importing torchvision (which loads torch._dynamo: ~2 s
    of CPU in a process that has not, such as a CLI evaluating or exporting a run)."""
    n, c, h, w = images.shape
    if n == 1:
        return images[0]  # as make_grid: one image, unpadded
    rows, cols = -(-n // per_row), min(n, per_row)
    grid = images.new_zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, image in enumerate(images):
        top, left = pad + (i // per_row) * (h + pad), pad + (i % per_row) * (w + pad)
        grid[:, top:top + h, left:left + w] = image
    return grid


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class Monitor:
    """Meters + console + the experiment trackers (rank 0) for one training run."""

    def __init__(self, cfg, env: DistEnv, vcfg: ViTConfig, run_dir: Path, total_steps: int):
        self.cfg, self.env, self.total_steps = cfg, env, total_steps
        peak = peak_flops(_device_name(), cfg.log.peak_tflops)
        self.meter = ThroughputMeter(train_flops_per_image(vcfg), env.world_size, peak)
        self.trackers = _start(cfg.log, run_dir, env)  # [] on the other ranks
        params = flat_params(cfg) if self.trackers else {}
        for t in self.trackers:  # at the start, so that a run that stops early still has its config
            t.log_params(params)
        self.log = get_logger()
        self._closed = False
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._grid_done = False
        self.sample_images: torch.Tensor | None = None  # a few training images (uint8), for the inspect figures
        self._t_start = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        """Accumulate a micro-batch loss on the device (no host sync)."""
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def first_batch(self, images: torch.Tensor, step: int) -> None:
        """Log a grid of the first training batch once (what the model really sees, after augmentation)."""
        if not self._grid_done:
            self._grid_done = True
            self.sample_images = images[:8].cpu()  # (8, 3, H, W)
            grid = image_grid(images[:32].cpu(), per_row=8)  # uint8 (3, H', W')
            self._image("train/batch", grid, step)

    def _global_loss(self, device: torch.device) -> float:
        """The mean micro-batch loss since the last log, over all ranks (the one host sync)."""
        if self._loss_sum is None:
            return float("nan")
        t = torch.stack([self._loss_sum.detach().float().reshape(()),
                         torch.tensor(float(self._loss_count), device=self._loss_sum.device)]).to(device)
        if torch_dist.is_initialized():
            torch_dist.all_reduce(t)
        self._loss_sum, self._loss_count = None, 0
        return (t[0] / t[1].clamp(min=1)).item()

    @staticmethod
    def data_faults(stream_stats: dict, device: torch.device) -> dict[str, int]:
        """Every rank's stream fault counts since the start, summed over ranks (a collective: call on all ranks)."""
        reasons = sorted(stream_stats["by_reason"])
        # on the backend's device: NCCL reduces only CUDA tensors
        counts = torch.tensor([stream_stats["by_reason"][r] for r in reasons], dtype=torch.int64, device=device)
        if torch_dist.is_initialized():
            torch_dist.all_reduce(counts)
        return dict(zip(reasons, counts.tolist(), strict=True))

    def log_train(self, backend, step: int, lr: float, skipped_steps: int, stream_stats: dict) -> None:
        """Log everything for the window since the last call (a collective: call on all ranks)."""
        loss = self._global_loss(backend.device)
        s = self.meter.summary()
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        self._scalars({
            "train/loss": loss, "train/lr": lr, "train/grad_norm": backend.grad_norm(),
            "train/loss_scale": backend.loss_scale(), "train/skipped_steps": skipped_steps,
            "perf/img_per_s": s["img_per_s"], "perf/img_per_s_per_gpu": s["img_per_s_per_device"],
            "perf/mfu": s["mfu"], "perf/data_wait_share": s["data_wait_share"], "perf/step_time": s["step_time"],
            "perf/gpu_mem_gib": mem,
        }, step)
        faults = self.data_faults(stream_stats, backend.device)
        self._scalars({f"data/skipped_{r}": n for r, n in faults.items()}, step)
        skipped = ", ".join(f"{r} {n}" for r, n in faults.items() if n)
        end = self.total_steps + skipped_steps  # a skipped step is made up: the run ends that much later
        eta = (end - step) * (s["step_time"] or 0.0)
        mfu = f" mfu {s['mfu']:.1%}" if s["mfu"] is not None else ""
        self.log.info(f"step {step}/{end} loss {loss:.4f} lr {lr:.2e} | {s['img_per_s']:.0f} img/s{mfu} "
                      f"data-wait {s['data_wait_share']:.0%} | eta {format_eta(eta)}"
                      + (f" | data skipped: {skipped}" if skipped else ""))

    def log_eval(self, metrics: dict, step: int) -> None:
        """eval/{top1,top5,loss,raw_top1} and one console line."""
        self._scalars({f"eval/{k}": metrics[k] for k in ("top1", "top5", "loss", "raw_top1") if k in metrics}, step)
        self.log.info(f"eval step {step}: top-1 {metrics['top1']:.2%} top-5 {metrics['top5']:.2%} "
                      f"({metrics['samples']} images)")

    def log_fewshot(self, results: dict, step: int, seconds: float) -> None:
        """Few-shot top-1 per dataset and shot count: `fewshot/<dataset>/<k>shot` and one console line."""
        self._scalars({f"fewshot/{name}/{k}shot": r["top1"] for name, res in results.items()
                         for k, r in res.items()}, step)
        text = "; ".join(f"{name} " + " ".join(f"{k}-shot {r['top1']:.1%}" for k, r in res.items())
                         for name, res in results.items())
        self.log.info(f"few-shot step {step}: {text} ({seconds:.1f} s)")

    def log_inspect(self, weights: dict[str, torch.Tensor], vcfg: ViTConfig, step: int, norm: tuple) -> None:
        """The inspect figures of these weights as tracker images `inspect/<figure>` (rank 0 only)."""
        if not self.trackers:
            return
        from vit.inspect import figure_rgb, inspect_model

        with torch.device("meta"):  # no initialisation: the weights are assigned
            model = VisionTransformer(vcfg)
        model.load_state_dict(weights, assign=True)
        _, figures = inspect_model(model, self.sample_images, norm)  # normalised as the run feeds the model
        for name, fig in figures.items():
            self._image(f"inspect/{name}", figure_rgb(fig), step)

    def _scalars(self, values: dict[str, float | None], step: int) -> None:
        for t in self.trackers:
            t.log_scalars(step, values)

    def _image(self, tag: str, img: torch.Tensor, step: int) -> None:
        for t in self.trackers:
            t.log_image(tag, img, step)

    def close(self, report: dict | None) -> None:
        """End the trackers' run: finished with the run's `report`, failed with None (an error or a signal:
        run.py calls it on every way out). Only the first call counts."""
        if self._closed:
            return
        self._closed = True
        for t in self.trackers:
            t.close(ok=report is not None)
        if report is not None:
            self.log.info(f"done: step {report['steps']} in {format_eta(time.perf_counter() - self._t_start)}")


def _start(log_cfg, run_dir: Path, env: DistEnv) -> list[Tracker]:
    """Rank 0 starts the trackers; every rank learns whether that failed (a collective), so that all stop with
    the same one-line error (exit 2) rather than the other ranks waiting on a lost peer."""
    trackers: list[Tracker] = []

    def start() -> str | None:
        try:
            trackers.extend(start_trackers(log_cfg, run_dir))
        except RuntimeError as err:
            return str(err)
        return None

    if error := main_decides(start, env):
        raise ConfigError(error)
    return trackers
