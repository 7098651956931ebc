"""Console and TensorBoard reporting for pre-training (rank 0 writes; every rank measures).

The loss is summed on the device and read only at log steps, so logging costs one host sync per
`log.every` steps.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torchvision

from pretrain.config import PretrainConfig
from runtime.config import to_dict
from runtime.dist import DistEnv
from runtime.logs import TBWriter, get_logger
from runtime.meters import ThroughputMeter, peak_flops
from vit import ViTConfig, train_flops_per_image


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class Monitor:
    """Meters + console + TensorBoard for one training run."""

    def __init__(self, cfg: PretrainConfig, env: DistEnv, vcfg: ViTConfig, run_dir: Path, total_steps: int):
        self.cfg, self.env, self.total_steps = cfg, env, total_steps
        peak = peak_flops(_device_name(), cfg.log.peak_tflops)
        self.meter = ThroughputMeter(train_flops_per_image(vcfg), env.world_size, peak)
        self.tb = TBWriter(run_dir / "tb", enabled=env.is_main)
        self.log = get_logger()
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self._grid_done = False
        self._t_start = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        """Accumulate a micro-batch loss on the device (no host sync)."""
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def first_batch(self, images: torch.Tensor, step: int) -> None:
        """Log a grid of the first training batch once (what the model really sees, after augmentation)."""
        if not self._grid_done:
            self._grid_done = True
            grid = torchvision.utils.make_grid(images[:32].cpu(), nrow=8)  # uint8 (3, H', W')
            self.tb.image("train/batch", grid, step)

    @staticmethod
    def data_faults(stream_stats: dict, device: torch.device) -> dict[str, int]:
        """Every rank's stream fault counts since the start, summed over ranks (a collective: call on all ranks)."""
        reasons = sorted(stream_stats["by_reason"])
        # on the engine's device: NCCL reduces only CUDA tensors
        counts = torch.tensor([stream_stats["by_reason"][r] for r in reasons], dtype=torch.int64, device=device)
        if torch_dist.is_initialized():
            torch_dist.all_reduce(counts)
        return dict(zip(reasons, counts.tolist(), strict=True))

    def log_train(self, engine, step: int, stream_stats: dict | None = None) -> None:
        """Read the loss (the one host sync), then log everything for the window since the last call.
        `stream_stats`: this rank's `loader.stats`; the skipped samples and broken shards of all ranks are logged
        as data/skipped_<reason> (totals since the start)."""
        loss = (self._loss_sum / max(self._loss_count, 1)).item() if self._loss_sum is not None else float("nan")
        self._loss_sum, self._loss_count = None, 0
        s = self.meter.summary()
        lr = engine.get_lr()[0]
        grad_norm = engine.get_global_grad_norm()
        scale = getattr(engine.optimizer, "cur_scale", None) if self.cfg.precision == "fp16" else None
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        self.tb.scalars({
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/loss_scale": scale,
            "perf/img_per_s": s["img_per_s"], "perf/img_per_s_per_gpu": s["img_per_s_per_device"],
            "perf/mfu": s["mfu"], "perf/data_wait_share": s["data_wait_share"], "perf/step_time": s["step_time"],
            "perf/gpu_mem_gib": mem, "train/skipped_steps": engine.skipped_steps,
        }, step)
        faults = self.data_faults(stream_stats, engine.device) if stream_stats is not None else {}
        self.tb.scalars({f"data/skipped_{r}": n for r, n in faults.items()}, step)
        skipped = ", ".join(f"{r} {n}" for r, n in faults.items() if n)
        eta = (self.total_steps - step) * (s["step_time"] or 0.0)
        mfu = f" mfu {s['mfu']:.1%}" if s["mfu"] is not None else ""
        self.log.info(f"step {step}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} | {s['img_per_s']:.0f} img/s{mfu} "
                      f"data-wait {s['data_wait_share']:.0%} | eta {eta / 60:.1f} min"
                      + (f" | data skipped: {skipped}" if skipped else ""))

    def log_eval(self, metrics: dict, step: int) -> None:
        self.tb.scalars({"eval/top1": metrics["top1"], "eval/top5": metrics["top5"]}, step)
        self.log.info(f"eval step {step}: top-1 {metrics['top1']:.2%} top-5 {metrics['top5']:.2%} "
                      f"({metrics['samples']} images)")

    def close(self, result: dict) -> None:
        flat = {f"{sec}.{k}": v for sec, d in to_dict(self.cfg).items() if isinstance(d, dict) for k, v in d.items()}
        final = {k: v for k, v in result.items() if k.startswith("eval/") and isinstance(v, float)}
        self.tb.hparams(flat, final or {"eval/top1": float("nan")})
        self.tb.close()
        self.log.info(f"done: step {result['step']} in {(time.perf_counter() - self._t_start) / 60:.1f} min")
