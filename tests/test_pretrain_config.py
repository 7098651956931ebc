"""Pre-training recipes, DeepSpeed config generation, parameter groups, the LR schedule and the run length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.config import RECIPES_DIR, load_pretrain_config
from runtime.config import ConfigError
from trainer.backend_deepspeed import deepspeed_config
from trainer.config import total_steps
from trainer.optim import lr_at, param_groups
from vit import VisionTransformer, vit_config

REQUIRED = ["data.path=/data/dataset.json", "run.dir=/tmp/run"]


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_loads(name: str) -> None:
    cfg = load_pretrain_config(name, REQUIRED)
    assert cfg.precision in ("bf16", "fp16", "fp32") and cfg.zero.stage in (0, 1, 2, 3, "auto")  # see plan.py
    vit_config(cfg.model.variant, image_size=cfg.model.image_size)  # a real variant at a valid size


def test_paper_numbers_in_l16_recipe() -> None:
    cfg = load_pretrain_config("vit_l16_in21k", REQUIRED)
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.weight_decay, o.betas, o.warmup_steps, o.schedule, o.clip) == (
        1e-3, 0.03, (0.9, 0.999), 10_000, "linear", 1.0)
    assert (t.global_batch, cfg.model.dropout, cfg.model.image_size, cfg.model.representation_size) == (
        4096, 0.1, 224, 1024)


def test_missing_required_keys_are_listed() -> None:
    with pytest.raises(ConfigError) as err:
        load_pretrain_config("debug_cpu")
    assert "data.path is required" in str(err.value) and "run.dir is required" in str(err.value)
    with pytest.raises(ConfigError, match="exactly one of train.steps, train.epochs"):
        load_pretrain_config("debug_cpu", [*REQUIRED, "train.epochs=2"])
    with pytest.raises(ConfigError, match="optim.lr must be >= 0"):
        load_pretrain_config("debug_cpu", [*REQUIRED, "optim.lr=-1"])
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_pretrain_config("debug_cpu", [*REQUIRED, "optim.learning_rate=1"])
    with pytest.raises(ConfigError, match="ema_decay needs full parameters"):
        load_pretrain_config("debug_cpu", [*REQUIRED, "zero.stage=3", "train.ema_decay=0.99"])
    for key in ("reduce_bucket_size", "allgather_bucket_size"):  # DeepSpeed's traceback in every rank at -1
        with pytest.raises(ConfigError, match=f"zero.{key} must be auto or >= 1 elements, got -1"):
            load_pretrain_config("debug_cpu", [*REQUIRED, f"zero.{key}=-1"])
    for size in (0, -5):  # 0 trained silently without the pre-logits layer; -5 was a traceback in every rank
        with pytest.raises(ConfigError, match=r"model.representation_size must be >= 1 .* or null"):
            load_pretrain_config("debug_cpu", [*REQUIRED, f"model.representation_size={size}"])


def test_deepspeed_config_from_recipe(tmp_path: Path) -> None:
    cfg = load_pretrain_config("vit_l16_in21k", [*REQUIRED, "zero.stage=2", "zero.offload_optimizer=true"])
    ds = deepspeed_config(cfg, world_size=16)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        4096, 128, 2)
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    fp16 = deepspeed_config(load_pretrain_config("debug_cpu", [*REQUIRED, "precision=fp16"]), world_size=2)
    assert fp16["fp16"]["loss_scale"] == 0 and "bf16" not in fp16  # dynamic loss scaling

    overlay = tmp_path / "ds.json"
    overlay.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "flops_profiler": {}}))
    ds = deepspeed_config(load_pretrain_config("debug_cpu", [*REQUIRED, f"deepspeed.config={overlay}"]), 2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123 and ds["zero_optimization"]["stage"] == 2
    overlay.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size 64 != micro 8"):
        deepspeed_config(load_pretrain_config("debug_cpu", [*REQUIRED, f"deepspeed.config={overlay}"]), 2)


def test_batch_arithmetic_error() -> None:
    cfg = load_pretrain_config("debug_cpu", [*REQUIRED, "train.global_batch=30"])
    with pytest.raises(ValueError, match="global batch 30 is not divisible by micro-batch 8 x world size 2"):
        deepspeed_config(cfg, world_size=2)


def test_no_weight_decay_for_biases_norms_tokens() -> None:
    model = VisionTransformer(vit_config("debug"))
    groups = param_groups(model, 0.05)
    assert len(groups) == 2  # without layer decay: one decayed and one undecayed group, both at scale 1
    decay, no_decay = groups
    assert decay["lr_scale"] == no_decay["lr_scale"] == 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "blocks.0.attn.qkv.bias", "patch_embed.bias"} <= skipped
    assert all(names[id(p)].endswith("weight") and p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warmup_then_decay() -> None:
    o = load_pretrain_config("debug_cpu", REQUIRED).optim
    o.warmup_steps, o.schedule, o.min_lr = 10, "linear", 0.0
    f = [lr_at(s, 110, o) / o.lr for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.5) and f[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))  # monotone after warm-up
    o.schedule = "cosine"
    assert lr_at(60, 110, o) / o.lr == pytest.approx(0.5) and lr_at(35, 110, o) / o.lr > 0.5 + 0.2
    o.min_lr = 1e-4  # the decay ends at min_lr, not 0
    assert lr_at(110, 110, o) == pytest.approx(1e-4)


def test_layer_decay_scales_groups() -> None:
    model = VisionTransformer(vit_config("debug"))
    groups = param_groups(model, 0.05, layer_decay=0.5)
    depth = len(model.blocks)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["patch_embed.weight"] == 0.5 ** (depth + 1)
    assert scale["blocks.0.attn.qkv.weight"] == 0.5 ** depth


def test_run_length_rounds_up() -> None:
    """One rule for both stages: epochs and samples are rounded UP to whole optimizer steps."""
    t = load_pretrain_config("debug_cpu", REQUIRED).train  # global_batch 32
    assert total_steps(t, 10) == 120  # train.steps as given
    t.steps, t.samples = None, 100
    assert total_steps(t, 10) == 4  # ceil(100 / 32)
    t.samples, t.epochs = None, 1.05
    assert total_steps(t, 10) == 11  # ceil(10.5)
