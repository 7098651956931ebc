"""Throughput meters: images/s, MFU and the share of step time spent waiting for data.

The trainer calls `start_wait()` before fetching a batch, `end_wait()` once it has it and
`end_step(images)` when the step's work is queued; `summary()` reads the window and resets it.
Nothing here synchronises the device: step times are host times over the logging window, which
is exact over a window because the device queue cannot run ahead without bound.
"""

from __future__ import annotations

import time

# Dense bf16 matrix throughput per device, TFLOP/s (vendor data sheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,  # fp16 tensor cores
    "RTX 4090": 165.0,
}


def peak_flops(device_name: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s for a device name (`torch.cuda.get_device_name()`), or None if unknown (no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in device_name.lower():
            return PEAK_BF16_TFLOPS[key] * 1e12
    return None


def matmul_tflops() -> float | None:
    """The bf16 matrix rate this GPU reaches on 8192^3 products (TFLOP/s; None without a GPU): the same-run
    ceiling the benchmarks quote MFU against beside the data-sheet peak."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12


def mfu_text(img_per_s: float, flops_per_image: float, peak: float | None, measured_tflops: float | None) -> str:
    """"MFU x% of peak, y% of measured matmul (z TFLOP/s)", with n/a where a figure is unknown."""
    achieved = img_per_s * flops_per_image
    of_peak = f"{achieved / peak:.1%}" if peak else "n/a"
    of_mm = f"{achieved / (measured_tflops * 1e12):.1%}" if measured_tflops else "n/a"
    return f"MFU {of_peak} of peak, {of_mm} of measured matmul ({measured_tflops or float('nan'):.0f} TFLOP/s)"


class ThroughputMeter:
    """Images/s (total and per device), MFU and data-wait share over a window of steps."""

    def __init__(self, flops_per_image: float, world_size: int = 1, peak_flops_per_device: float | None = None):
        self.flops_per_image = flops_per_image
        self.world_size = world_size
        self.peak = peak_flops_per_device
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self._wait_start: float | None = None
        self.wait = 0.0
        self.images = 0
        self.steps = 0

    def start_wait(self) -> None:
        self._wait_start = time.perf_counter()

    def end_wait(self) -> None:
        if self._wait_start is not None:
            self.wait += time.perf_counter() - self._wait_start
            self._wait_start = None

    def end_step(self, images: int) -> None:
        """Count one finished step of `images` images across the whole job."""
        self.images += images
        self.steps += 1

    def summary(self, reset: bool = True) -> dict[str, float | None]:
        """img_per_s, img_per_s_per_device, mfu (None without a peak), data_wait_share, step_time."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        ips = self.images / elapsed
        per_dev = ips / self.world_size
        out = {
            "img_per_s": ips,
            "img_per_s_per_device": per_dev,
            "mfu": per_dev * self.flops_per_image / self.peak if self.peak else None,
            "data_wait_share": self.wait / elapsed,
            "step_time": elapsed / self.steps if self.steps else None,
        }
        if reset:
            self.reset()
        return out
