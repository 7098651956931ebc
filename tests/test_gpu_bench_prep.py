"""The CPU-checkable parts of the GPU benchmarks and checks (bench/fp8_trial.py, bench/end_to_end.py,
bench/train_throughput.py, bench/dropout_masks.py), so that a session lent a GPU does not spend it on their bugs:
the float8 swap of the ViT's Linear layers, the real-photo JPEG shards of the end-to-end run, the kernel-time
profile by kind, the recovery of dropout masks and what counts as a bad one."""

from __future__ import annotations

import copy
import functools
import io
import json
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

from vit import VisionTransformer, vit_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import dropout_masks  # noqa: E402
from end_to_end import make_shards  # noqa: E402
from fp8_trial import to_float8, verdict  # noqa: E402
from train_throughput import by_kind, kernel_time, kind_of, print_profile  # noqa: E402


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


def _run(recipe: str, fp8: bool, seed: int, rate: float, loss: float) -> dict:
    return {"recipe": recipe, "fp8": fp8, "seed": seed, "img_per_s": rate, "loss": loss, "finite": True}


def test_fp8_is_offered_only_fast_enough_everywhere_with_the_loss_inside_the_seed_spread(capsys):
    args = SimpleNamespace(recipes=["L", "H"], loss_steps=300)
    h = [_run("H", False, 0, 100.0, 0.0), _run("H", True, 0, 120.0, 0.0)]
    cases = {  # (L's bf16 seed-0 (rate, loss), fp8's, bf16 seed 1's loss or None); H's fp8 at 1.2x: verdict
        ((100.0, 2.0), (120.0, 2.05), 2.1): "offer precision=fp8",
        ((100.0, 2.0), (120.0, 2.2), 2.1): "leave fp8 out",  # loss outside the spread
        ((100.0, 2.0), (110.0, 2.0), 2.1): "leave fp8 out",  # 1.10x: too slow
        ((100.0, 2.0), (120.0, 2.0), None): "leave fp8 out",  # no second seed: no spread to check against
    }
    for (bf0, f8, bf1), expected in cases.items():
        results = [_run("L", False, 0, *bf0), _run("L", True, 0, *f8), *h]
        if bf1 is not None:
            results.append(_run("L", False, 1, bf0[0], bf1))
        verdict(args, results)
        assert capsys.readouterr().out.splitlines()[-1].startswith(f"verdict: {expected}")
    h[1]["img_per_s"] = 110.0  # L passes, H too slow
    verdict(args, [_run("L", False, 0, 100.0, 2.0), _run("L", True, 0, 120.0, 2.0),
                   _run("L", False, 1, 100.0, 2.1), *h])
    assert "verdict: leave fp8 out" in capsys.readouterr().out


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
             "triton_poi_fused_native_dropout_philox_3": "fused with dropout",
             "void at::native::(anonymous)::fused_dropout_kernel_vec<...>": "dropout",
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
    assert all(kind == kind_of(name) for kind, name in ms)
    kinds = by_kind(ms)
    assert kinds["matmul"] > 0 and kinds["dropout"] > 0 and sum(kinds.values()) > kinds["matmul"]


def test_profile_table_names_the_time_no_kernel_ran_and_where_ours_spends_more(capsys):
    ours = {("matmul", "gemm_a"): 10.0, ("copy", "Memcpy DtoD"): 3.0, ("other", "grad_acc_add"): 2.0}
    timm = {("matmul", "gemm_a"): 10.5, ("copy", "Memcpy DtoD"): 1.0}
    print_profile(ours, timm, [20.0, 12.5])
    out = capsys.readouterr().out.splitlines()
    rows = {line[:20].strip(): line[20:].split() for line in out if not line.startswith("ours +")}
    assert rows["kernels, total"] == ["15.00", "11.50"] and rows["no kernel running"] == ["5.00", "1.00"]
    assert rows["copy"] == ["3.00", "1.00"] and rows["other"] == ["2.00", "0.00"]
    assert [line.split()[:3] for line in out if line.startswith("ours +")] == [
        ["ours", "+2.00", "ms"], ["ours", "+2.00", "ms"]]  # copy and the accumulation add; not the matmul
    assert {line.split()[-1] for line in out if line.startswith("ours +")} == {"DtoD", "grad_acc_add"}


def test_dropout_masks_recovered_exactly_and_bad_ones_named(capsys, monkeypatch):
    """The real model's masks pass (eager on the CPU, with and without gradient checkpointing); masks duplicated in
    groups of 4 channels (the compiled CUDA bug the patch conv's layout avoids, docs/architecture.md "Model"), a
    wrong rate, or a backward that applies another mask are each named."""
    assert dropout_masks.main(["--variant", "debug", "--image-size", "32", "--device", "cpu", "--no-compile"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split(" (")[0] for x in lines] == ["check dropout masks without checkpointing",
                                                 "check dropout masks with gradient checkpointing"]
    assert all(x.endswith("; torch " + torch.__version__ + ", cpu, eager): ok") for x in lines), lines
    torch.manual_seed(0)
    model = dropout_masks.build("debug", 32, 0.5, depth=2)
    found = dropout_masks.recover(model, torch.randn(8, 3, 32, 32), 0.5, compile=False)
    assert list(found) == ["embedding", "block 0 MLP", "block 1 MLP"]
    masks = [m for m, _, _ in found.values()]
    assert all(m.shape == (8, 17, 32) for m in masks) and not torch.equal(masks[1], masks[2])  # one mask each
    assert all(torch.equal(fwd, bwd) for _, fwd, bwd in found.values())  # exact in fp32, both ways
    mask, fwd, bwd = found["embedding"]
    assert dropout_masks.findings("embedding", mask, fwd, bwd, 0.5) == []

    dup = mask[..., ::4].repeat_interleave(4, dim=-1)  # channels 4k..4k+3 share one mask
    (bad,) = dropout_masks.findings("x", dup, dup.sum(0).float(), dup.sum(0).float(), 0.5)
    assert bad.startswith("x: neighbours along the channel axis agree 0.8")
    fewer = mask & (torch.rand(mask.shape) < 0.9)
    assert "x: keep rate" in dropout_masks.findings("x", fewer, fewer.sum(0).float(), fwd, 0.5)[0]
    other = bwd.clone()
    other[0, 0] += 1
    assert dropout_masks.findings("x", mask, fwd, other, 0.5) == [
        f"x: the backward applied another mask than the forward at {1 / fwd.numel():.1%} of the positions"]
    # a checkpointed recompute that draws fresh masks (what the bug does to it) is caught through the real model
    monkeypatch.setattr("vit.model.checkpoint", functools.partial(checkpoint, preserve_rng_state=False))
    model.set_grad_checkpointing(True)
    found = dropout_masks.recover(model, torch.randn(8, 3, 32, 32), 0.5, compile=False)
    bad = [f for name, masks in found.items() for f in dropout_masks.findings(name, *masks, 0.5)]
    assert [f.split(":")[0] for f in bad] == ["block 0 MLP", "block 1 MLP"], bad
    assert all("the backward applied another mask than the forward" in f for f in bad)
