"""The CPU-checkable parts of the GPU benchmarks (bench/fp8_trial.py, bench/end_to_end.py,
bench/train_throughput.py), so that a session lent a GPU does not spend it on their bugs: the float8 swap of the
ViT's Linear layers, the real-photo JPEG shards of the end-to-end run, the kernel-time profile by kind."""

from __future__ import annotations

import copy
import io
import json
import sys
import tarfile
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from vit import VisionTransformer, vit_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from end_to_end import make_shards  # noqa: E402
from fp8_trial import to_float8  # noqa: E402
from train_throughput import kernel_time, kind_of  # noqa: E402


def test_fp8_swaps_the_block_linears_and_stays_close_to_bf16():
    torch.manual_seed(0)
    model = VisionTransformer(vit_config("debug", image_size=32, num_classes=10))
    nn.init.normal_(model.head.weight, std=0.5)  # the zero-initialised head would hide every difference
    model = model.to(torch.bfloat16)
    fp8 = copy.deepcopy(model)
    swapped = to_float8(fp8)
    depth = len(model.blocks)
    assert swapped == [f"blocks.{i}.{m}" for i in range(depth) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert type(fp8.head) is nn.Linear and type(fp8.blocks[0].mlp.fc1) is not nn.Linear

    x = torch.randn(16, 3, 32, 32, dtype=torch.bfloat16)
    y, y8 = model(x), fp8(x)
    rel = ((y8 - y).float().norm() / y.float().norm()).item()
    assert 1e-3 < rel < 0.2, rel  # float8 matmuls (not bf16 ones), still close to bf16
    y.float().pow(2).sum().backward()
    y8.float().pow(2).sum().backward()
    for (name, p), p8 in zip(model.named_parameters(), fp8.parameters(), strict=True):
        cos = nn.functional.cosine_similarity(p.grad.float().flatten(), p8.grad.float().flatten(), dim=0)
        assert cos > 0.9, (name, cos.item())


def test_end_to_end_shards_are_real_photos_at_imagenet_size(tmp_path):
    manifest = make_shards(tmp_path / "shards", images=24, classes=5, workers=2)
    meta = json.loads(manifest.read_text())
    assert meta["splits"]["train"]["samples"] == 24 and len(meta["classes"]) == 5
    sizes = []
    for shard in meta["splits"]["train"]["shards"]:
        with tarfile.open(manifest.parent / shard["name"]) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    assert img.format == "JPEG" and img.mode == "RGB"
                    sizes.append(img.size)
    assert len(sizes) == 24
    assert sizes.count((375, 500)) == 6 and sizes.count((500, 375)) == 18  # one in four portrait
    assert make_shards(tmp_path / "shards", images=99, classes=5, workers=2) == manifest  # kept, not rewritten
    assert json.loads(manifest.read_text()) == meta


def test_kernel_names_sorted_by_kind_and_a_step_profiled():
    names = {"sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64": "matmul",
             "nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT": "matmul",
             "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>": "attention",
             "triton_poi_fused_native_dropout_philox_3": "dropout RNG",
             "void at::native::(anonymous)::multi_tensor_apply_kernel<...>": "optimizer",
             "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "all-reduce",
             "Memcpy DtoD (Device -> Device)": "copy", "triton_per_fused_native_layer_norm_7": "fused (compiled)",
             "aten::addmm": "matmul", "aten::gelu": "other"}
    assert {n: kind_of(n) for n in names} == names
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Dropout(0.1), nn.Linear(1024, 256))
    x = torch.randn(64, 256)

    def step() -> None:
        net(x).pow(2).mean().backward()

    ms = kernel_time(step, steps=2)
    assert ms["matmul"] > 0 and ms["dropout RNG"] > 0 and sum(ms.values()) > ms["matmul"]
