"""`zero.stage=auto` and `python -m pretrain plan`: the stage chooser against DeepSpeed's own estimators."""

from __future__ import annotations

import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from pretrain.config import load_pretrain_config
from pretrain.plan import MARGIN, activation_bytes, bucket_elements, param_counts, plan, resolve_zero
from tests.conftest import ROOT
from vit import vit_config

GIB = 2**30


@pytest.mark.parametrize("variant", ["B/16", "L/16", "H/14"])
@pytest.mark.parametrize("gpus,nodes", [(1, 1), (8, 1), (8, 4)])
def test_stage_2_and_3_states_are_deepspeeds_estimates(variant, gpus, nodes):
    vcfg = vit_config(variant)
    params, largest = param_counts(vcfg)
    assert params == pytest.approx({"B/16": 86.6e6, "L/16": 304.3e6, "H/14": 632.0e6}[variant], rel=2e-3)  # paper
    assert largest == 4 * vcfg.width**2  # an MLP matrix
    _, rows = plan(vcfg, 32, 1, gpus, nodes, 80)
    z2 = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)[1]
    z3 = estimate_zero3_model_states_mem_needs(params, largest, gpus, nodes, cpu_offload=False,
                                               cpu_offload_params=False)[1]
    assert rows[2].states_gib == pytest.approx(z2 / GIB) and rows[3].states_gib == pytest.approx(z3 / GIB)
    # stage 1 partitions master weights and moments (12 of its 20 bytes per parameter); stage 0 nothing
    assert rows[0].states_gib == pytest.approx(20 * params / GIB)
    assert rows[1].states_gib == pytest.approx((8 * params + 12 * params // (gpus * nodes)) / GIB)
    assert rows[0].states_gib >= rows[1].states_gib >= rows[2].states_gib


# (variant, micro-batch, GPUs per node, nodes, GiB per GPU, grad checkpointing) -> the stage auto must choose
CASES = [
    ("L/16", 128, 8, 1, 80, False, 1),  # fits at stage 1: the fastest (H200: 1.03x timm vs 0.63x at stage 2)
    ("H/14", 64, 8, 1, 80, False, 1),
    ("L/16", 128, 1, 1, 80, False, 1),  # one GPU: stage 1 fits
    ("H/14", 128, 1, 1, 40, False, 3),  # one GPU, nothing fits: stage 2 partitions nothing, so 3 (with a warning)
    ("H/14", 64, 8, 1, 30, False, 2),  # stage 1 does not fit in 30 GiB, stage 2 does
    ("H/14", 64, 8, 1, 16, True, 1),  # activation checkpointing shrinks activations: stage 1 fits again
    ("H/14", 64, 8, 1, 16, False, 3),
]


@pytest.mark.parametrize("variant,mb,gpus,nodes,mem,ckpt,want", CASES)
def test_auto_chooses_the_lowest_stage_that_fits(variant, mb, gpus, nodes, mem, ckpt, want):
    chosen, rows = plan(vit_config(variant), mb, 4, gpus, nodes, mem, ckpt)
    assert chosen == want, [(r.stage, round(r.total_gib, 1), r.fits) for r in rows]
    budget = MARGIN * mem
    for r in rows[1:want]:  # every lower stage (from 1) really does not fit, unless it is stage 2 on one GPU
        assert r.total_gib > budget or (r.stage == 2 and gpus * nodes == 1)
    if rows[want].fits:
        assert rows[want].total_gib <= budget


def test_activation_estimate_scales_and_checkpointing_cuts_it():
    vcfg = vit_config("L/16")
    full, half = activation_bytes(vcfg, 128, False), activation_bytes(vcfg, 64, False)
    assert full == pytest.approx(2 * half, rel=1e-6)
    # timm's compiled L/16 loop peaks at 25.3 GiB at micro-batch 128 (docs/performance.md): activations dominate
    assert 15 * GIB < full < 25 * GIB
    assert activation_bytes(vcfg, 128, True) < full / 8  # block inputs + one block


def test_resolve_zero_sizes_buckets_and_overlap():
    cfg = load_pretrain_config("vit_l16_in21k", ["data.path=x", "run.dir=x"])
    zero, line = resolve_zero(cfg, vit_config("L/16", num_classes=21843), 8, 1, 80.0)
    assert zero.stage == 1 and "ZeRO-1" in line and "GiB" in line
    assert 5e7 <= zero.reduce_bucket_size == zero.allgather_bucket_size <= 2e8
    assert zero.overlap_comm is False  # the recipe compiles the model: DeepSpeed's hooks fire after the graph
    eager = load_pretrain_config("vit_l16_in21k", ["data.path=x", "run.dir=x", "model.compile=false", "zero.stage=2",
                                                   "zero.reduce_bucket_size=123"])
    zero, line = resolve_zero(eager, vit_config("L/16"), 8, 1, 80.0)
    assert (zero.stage, zero.overlap_comm, zero.reduce_bucket_size, line) == (2, True, 123, None)  # explicit: kept
    assert bucket_elements(10**6) == 5e7 and bucket_elements(10**10) == 2e8


def test_plan_verb_prints_every_stage_for_l16_and_h14(cli_server):
    """L/16 in a fresh `python -m pretrain plan` (the entry point); H/14 and the bad --gpus through the CLI
    server (tests/conftest.py: the same main, forked from a process that imported it once)."""
    for recipe, variant in (("vit_l16_in21k", "L/16"), ("vit_h14_in21k", "H/14")):
        args = ["plan", recipe, "--gpus", "8", "--gpu-mem", "80"]
        if variant == "L/16":
            out = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
        else:
            out = cli_server.run("pretrain", *args)
        assert out.returncode == 0, out.stderr
        lines = [ln for ln in out.stdout.strip().splitlines() if not ln.startswith("[")]  # DeepSpeed's own log lines
        assert lines[0].startswith(f"{variant} @ 224 px") and "8 GPUs" in lines[0]
        rows = [ln for ln in lines if ln.startswith("ZeRO-")]
        assert [r.split()[0] for r in rows] == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
        assert rows[1].endswith("<- chosen") and lines[-1].startswith("zero.stage=auto -> ZeRO-1")
    bad = cli_server.run("pretrain", "plan", "vit_l16_in21k", "--gpus", "7")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "divisible" in bad.stderr
