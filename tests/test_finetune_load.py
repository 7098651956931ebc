"""Fine-tune loading contract, pos-embed resampling on load, timm weights, layer decay, schedule, EMA, recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finetune.config import RECIPES_DIR, FinetuneConfig, load_finetune_config
from finetune.load import build_finetune_model, finetune_config, read_checkpoint
from runtime.config import ConfigError
from trainer.export import export, load_eval_model
from trainer.optim import EMA, build_optimizer, lr_at, param_groups
from vit import VisionTransformer, vit_config
from vit.weights import save_weights, to_timm

REQUIRED = ["init=m.safetensors", "data.path=d.json", "run.dir=r"]


def _pretrained(representation_size: int | None = 16) -> tuple[dict, object]:
    cfg = vit_config("debug", patch_size=4, image_size=16, representation_size=representation_size, num_classes=7)
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    for p in model.parameters():  # a trained-looking model: no zero head, no tiny cls token
        torch.nn.init.normal_(p, std=0.1)
    return model.state_dict(), cfg


def _field(gh: int, gw: int, dim: int = 4) -> torch.Tensor:
    """A smooth, asymmetric field sampled at patch centres of a gh x gw grid: (1, gh*gw, dim), row-major."""
    y = (torch.arange(gh) + 0.5) / gh  # row centres in (0, 1)
    x = (torch.arange(gw) + 0.5) / gw
    yy, xx = torch.meshgrid(y, x, indexing="ij")  # (gh, gw)
    chans = [torch.sin(math.pi * 0.5 * yy), torch.cos(math.pi * 0.5 * xx), yy * 0.3 + xx * 0.1, torch.sin(xx + 2 * yy)]
    return torch.stack(chans[:dim], dim=-1).reshape(1, gh * gw, dim)


@pytest.mark.parametrize("new_grid", [(8, 8), (8, 12)])
def test_smooth_position_field_is_resampled_row_major(new_grid: tuple[int, int]) -> None:
    sd, src = _pretrained()
    D = src.width
    cls = torch.randn(1, 1, D)
    field = _field(4, 4).repeat(1, 1, D // 4)  # (1, 16, D): 4 channels repeated
    sd["pos_embed"] = torch.cat([cls, field], dim=1)
    dst = finetune_config(src, image_size=(new_grid[0] * 4, new_grid[1] * 4), num_classes=3)
    model = build_finetune_model(sd, src, dst)
    pos = model.pos_embed.detach()
    want = _field(*new_grid).repeat(1, 1, D // 4)
    torch.testing.assert_close(pos[:, :1], cls)  # class token kept apart, unchanged
    err = (pos[:, 1:] - want).abs()
    inner = err.reshape(*new_grid, D)[1:-1, 1:-1]  # the border extrapolates (clamped), the inside interpolates
    assert err.mean() < 0.03 and inner.max() < 0.08, (err.mean(), inner.max())
    # A transposed grid (column-major reading) is far off the analytic field.
    gh, gw = new_grid
    wrong = _field(gw, gh).reshape(1, gw, gh, 4).transpose(1, 2).reshape(1, gh * gw, 4).repeat(1, 1, D // 4)
    assert (pos[:, 1:] - wrong).abs().mean() > 5 * err.mean()


def test_bilinear_option_differs_from_bicubic() -> None:
    sd, src = _pretrained()
    dst = finetune_config(src, image_size=32, num_classes=3)
    bicubic = build_finetune_model(sd, src, dst, mode="bicubic").pos_embed
    bilinear = build_finetune_model(sd, src, dst, mode="bilinear").pos_embed
    assert not torch.allclose(bicubic, bilinear)
    with pytest.raises(ValueError, match="bicubic"):
        build_finetune_model(sd, src, dst, mode="nearest")


def test_only_the_head_is_reinitialised() -> None:
    sd, src = _pretrained()
    dst = finetune_config(src, image_size=32, num_classes=3, drop_path=0.1)
    model = build_finetune_model(sd, src, dst)
    new = model.state_dict()
    assert "pre_logits.fc.weight" not in new  # the tanh pre-training layer is dropped, as in the paper
    assert not torch.any(new["head.weight"]) and not torch.any(new["head.bias"])
    assert new["head.weight"].shape == (3, src.width)
    for k, v in sd.items():
        if k.startswith(("head.", "pre_logits.", "pos_embed")):
            continue
        assert torch.equal(new[k], v), k  # every body weight loaded as is
    assert model.blocks[-1].drop_path == pytest.approx(0.1)
    logits = model(torch.randn(2, 3, 32, 32))
    assert torch.equal(logits, torch.zeros(2, 3))  # zero head: loss starts at log(K)


@pytest.mark.parametrize("change,match", [(dict(patch_size=8, image_size=32), "patch_size 4 .* vs 8"),
                                          (dict(width=64), "width 32 .* vs 64")])
def test_other_patch_size_or_width_fails_clearly(change: dict, match: str) -> None:
    sd, src = _pretrained()
    dst = src.replace(num_classes=3, representation_size=None, **change)
    with pytest.raises(ValueError, match=match):
        build_finetune_model(sd, src, dst)
    with pytest.raises(ValueError, match="not a L/16 model"):
        finetune_config(src, image_size=64, num_classes=3, variant="L/16")


def test_missing_or_unexpected_keys_break_the_contract() -> None:
    sd, src = _pretrained()
    dst = finetune_config(src, image_size=32, num_classes=3)
    broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mlp.fc2.weight'\]"):
        build_finetune_model(broken, src, dst)
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.extra'\]"):
        build_finetune_model({**sd, "blocks.0.extra": torch.zeros(1)}, src, dst)


def test_weight_file_and_timm_state_dict(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    sd, src = _pretrained()
    path = save_weights(tmp_path / "m.safetensors", sd, src, class_names=list("abcdefg"))
    sd2, cfg2, names = read_checkpoint(path)
    assert cfg2 == src and names == list("abcdefg")
    # A timm ViT file has no vitscale metadata: the config comes from the shapes (timm has no pre-logits layer).
    sd, _ = _pretrained(representation_size=None)
    t = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                                         mlp_ratio=2.0, num_classes=7)
    t.load_state_dict(to_timm(sd))
    save_file({k: v.contiguous() for k, v in t.state_dict().items()}, str(tmp_path / "timm.safetensors"))
    sd3, cfg3, _ = read_checkpoint(tmp_path / "timm.safetensors")
    assert (cfg3.patch_size, cfg3.width, cfg3.depth, cfg3.heads, cfg3.grid) == (4, 32, 2, 2, (4, 4))
    model, _ = load_eval_model(tmp_path / "timm.safetensors")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(x), t.eval()(x), atol=1e-4, rtol=1e-4)
    ft = build_finetune_model(sd3, cfg3, finetune_config(cfg3, image_size=24, num_classes=2))
    assert ft.pos_embed.shape == (1, 37, 32)
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_checkpoint(tmp_path / "bad.safetensors")


def test_layer_decay_groups_and_no_weight_decay() -> None:
    model = VisionTransformer(vit_config("debug", depth=3))
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert scale["head.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["blocks.2.attn.qkv.weight"] == 0.5 and scale["blocks.0.mlp.fc1.weight"] == 0.125
    assert scale["patch_embed.weight"] == scale["pos_embed"] == 0.0625
    assert wd["blocks.0.attn.qkv.weight"] == 0.05
    assert wd["blocks.0.attn.qkv.bias"] == wd["pos_embed"] == wd["cls_token"] == wd["norm.weight"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_schedule_and_optimizer() -> None:
    cfg = load_finetune_config("vit_l16_384", REQUIRED + ["optim.warmup_steps=10", "optim.lr=0.1"]).optim
    assert lr_at(0, 100, cfg) == pytest.approx(0.01) and lr_at(9, 100, cfg) == pytest.approx(0.1)
    assert lr_at(55, 100, cfg) == pytest.approx(0.05, abs=1e-3) and lr_at(100, 100, cfg) == pytest.approx(0.0)
    opt = build_optimizer(param_groups(VisionTransformer(vit_config("debug")), cfg.weight_decay), cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # the paper: no weight decay


def test_ema_warms_up_and_averages() -> None:
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update: decay min(0.9999, 1/10) = 0.1
    torch.testing.assert_close(ema.state_dict()["weight"], torch.full((1, 2), 0.9))
    for _ in range(200):
        ema.update(model)
    assert ema.state_dict()["weight"].min() > 0.99 and ema.updates == 201


def test_recipes_load_and_bad_configs_are_refused() -> None:
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert names == ["debug_cpu", "vit_h14_384", "vit_l16_384", "vit_l16_384_mae"]
    for name in names:
        cfg = load_finetune_config(name, REQUIRED)
        assert isinstance(cfg, FinetuneConfig) and cfg.model.image_size
        vit_config(cfg.model.variant or "debug", image_size=cfg.model.image_size)  # size fits the patch
    mae = load_finetune_config("vit_l16_384_mae", REQUIRED)
    assert (mae.optim.name, mae.optim.layer_decay, mae.model.drop_path, mae.train.mixup) == ("adamw", 0.75, 0.2, 0.8)
    with pytest.raises(ConfigError, match="init is required"):
        load_finetune_config("debug_cpu", ["data.path=d.json", "run.dir=r"])
    with pytest.raises(ConfigError, match="did you mean 'optim.layer_decay'"):
        load_finetune_config("debug_cpu", REQUIRED + ["optim.layer_decy=0.5"])
    with pytest.raises(ConfigError, match="zero_stage must be 0"):
        load_finetune_config("debug_cpu", REQUIRED + ["deepspeed.zero_stage=3"])


def test_a_folder_that_is_no_run_dir_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no complete checkpoint .* pass a weight file"):
        export(tmp_path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ConfigError):  # as init=: one clear error, not a traceback from deep inside a loader
        read_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="no weight file or run dir"):
        load_eval_model(tmp_path / "nope")


def test_the_run_normalises_as_data_says_else_as_the_init_was_trained_else_as_imagenet(tmp_path: Path) -> None:
    from finetune.load import read_init
    from trainer.run import normalisation, resize_filter
    from vit.weights import IMAGENET_MEAN, IMAGENET_STD, EvalSettings

    half = ((0.5,) * 3, (0.5,) * 3)
    sd, cfg = _pretrained()
    ours = save_weights(tmp_path / "m.safetensors", sd, cfg, eval_settings=EvalSettings(16, mean=half[0], std=half[1]))
    save_file(to_timm(sd), tmp_path / "timm.safetensors")  # a bare state dict: no record of its inputs
    init = read_init(ours).eval_settings
    assert read_init(tmp_path / "timm.safetensors").eval_settings is None
    data = load_finetune_config("debug_cpu", REQUIRED).data
    mine = load_finetune_config("debug_cpu", [*REQUIRED, "data.mean=[0.1,0.2,0.3]", "data.std=[0.4,0.5,0.6]"]).data
    only_std = load_finetune_config("debug_cpu", [*REQUIRED, "data.std=[0.4,0.5,0.6]"]).data
    assert normalisation(data, (init.mean, init.std)) == (*half, "the init's eval settings")
    assert normalisation(data, None) == (IMAGENET_MEAN, IMAGENET_STD, "ImageNet's")
    assert normalisation(mine, half) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "data.mean and data.std")
    assert normalisation(only_std, half) == (half[0], (0.4, 0.5, 0.6), "data.std, the rest the init's eval settings")
    # the resize filter: data.interpolation, else the init's, else PIL's bilinear
    bilinear = load_finetune_config("debug_cpu", [*REQUIRED, "data.interpolation=bilinear"]).data
    assert data.interpolation is None and resize_filter(data, "bicubic") == ("bicubic", "the init's eval settings")
    assert resize_filter(data, None) == ("bilinear", "the default")
    assert resize_filter(bilinear, "bicubic") == ("bilinear", "data.interpolation")


def test_eval_verbs_use_the_files_settings_unless_the_command_line_gives_one(tmp_path: Path) -> None:
    from trainer.evaluate import EVAL_OPTIONS, overridden, verb_options
    from vit.weights import EvalSettings

    file = EvalSettings(16, crop_pct=0.9, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    (tmp_path / "dataset.json").write_text("{}")
    path = f"data.path={tmp_path / 'dataset.json'}"
    data, settings = overridden(file, *verb_options([path], EVAL_OPTIONS, "eval"))
    assert settings == file and (data.crop_pct, data.interpolation) == (0.9, "bicubic")
    given = [path, "data.interpolation=bilinear", "data.crop_pct=1.0", "data.std=[0.2,0.2,0.2]", "eval.precision=bf16"]
    data, settings = overridden(file, *verb_options(given, EVAL_OPTIONS, "eval"))
    assert settings == file.replace(interpolation="bilinear", crop_pct=1.0, std=(0.2,) * 3, precision="bf16")
    assert (data.crop_pct, data.interpolation) == (1.0, "bilinear")
    data, settings = overridden(file, *verb_options([path, "data.decode=gpu"], EVAL_OPTIONS, "eval"))
    assert (data.decode, data.interpolation) == ("gpu", "bicubic")  # the device decode resizes with PIL's filters
