"""Weights in and out of the ecosystem: timm loads our files strictly, transformers loads `export --format hf`,
and `init=` reads timm files, transformers folders/files and big_vision/AugReg .npz, with logits equal (1e-4).

Random-init models in fp32, batch 2: depth-reduced B/16 for most round trips (at a non-square size, so the
position embeddings are checked at the model's own resolution), the real B/16 and L/16 once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune.load import build_finetune_model, finetune_config, read_checkpoint
from runtime.config import ConfigError
from trainer.export import export, load_eval_model
from vit import VisionTransformer, ViTConfig, vit_config
from vit.convert import to_big_vision, to_timm
from vit.interop import read_any, save_hf, save_npz
from vit.weights import EvalSettings, identify_weights, load_weights, read_metadata, save_weights

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
TOL = dict(atol=1e-4, rtol=1e-4)
NAMES = ["ant", "bee", "cat", "dog", "eel"]


def _model(variant: str = "B/16", depth: int | None = 2, image_size=(48, 64), **kw) -> VisionTransformer:
    """A random model whose every weight matters (no zero head, LayerNorms near 1)."""
    cfg = vit_config(variant, image_size=image_size, num_classes=len(NAMES), **({"depth": depth} if depth else {}),
                     **kw)
    with torch.device("meta"):  # the model's own init is seconds at L/16 and every value is replaced below
        model = VisionTransformer(cfg).eval()
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + centre)
    return model


def _x(cfg: ViTConfig) -> torch.Tensor:
    return torch.randn(2, 3, *cfg.image_hw, generator=torch.Generator().manual_seed(1))


def _timm(cfg: ViTConfig, **kw) -> torch.nn.Module:
    name = {768: "vit_base_patch16_224", 1024: "vit_large_patch16_224"}[cfg.width]
    return timm.create_model(name, pretrained=False, num_classes=cfg.num_classes, depth=cfg.depth,
                             img_size=cfg.image_hw, **kw).eval()


def _run_dir(tmp_path: Path, model: VisionTransformer) -> Path:
    """A fine-tuning run dir (Accelerate layout) holding `model` at step 7."""
    run, cfg = tmp_path / "run", model.cfg
    tag = run / "checkpoints" / "global_step7"
    tag.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tag / "model.safetensors"))
    state = {"step": 7, "applied": 7, "skipped": 0, "evals": [], "best_top1": None, "stream": {}, "ema_updates": 0,
             "world_size": 1, "backend": "accelerate", "class_names": NAMES, "vit_config": cfg.to_json(),
             "eval_settings": {"image_size": list(cfg.image_hw), "crop_pct": 1.0, "mean": [0.5] * 3, "std": [0.5] * 3}}
    (tag / "trainer_state.json").write_text(json.dumps(state))
    (run / "checkpoints" / "latest").write_text("global_step7")
    return run


def _hf_logits(folder: Path, x: torch.Tensor) -> torch.Tensor:
    model, info = transformers.ViTForImageClassification.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return model.eval()(pixel_values=x).logits


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_exported_file_is_a_strict_timm_state_dict_with_our_metadata(tmp_path: Path) -> None:
    model = _model()
    x = _x(model.cfg)
    path = export(_run_dir(tmp_path, model))
    t = _timm(model.cfg)
    t.load_state_dict(load_file(str(path)), strict=True)  # timm's names, nothing extra
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), **TOL)
    meta = read_metadata(path)
    assert meta["config"] == model.cfg and meta["class_names"] == NAMES and meta["step"] == 7
    assert meta["eval"] == EvalSettings(image_size=(48, 64), crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    sd, _ = load_weights(path)  # our names again, for everything that builds our model
    _same(sd, model.state_dict())
    assert "patch_embed.proj.weight" in load_file(str(path)) and "patch_embed.weight" in sd
    assert export(tmp_path / "run", tmp_path / "t.safetensors", timm=True).is_file()  # --timm: the same file
    _same(load_file(str(tmp_path / "t.safetensors")), load_file(str(path)))


def test_pre_logits_model_keeps_its_layer_but_is_refused_as_timm(tmp_path: Path, capsys) -> None:
    from finetune.__main__ import main

    model = _model(representation_size=32)
    run = _run_dir(tmp_path, model)
    sd, meta = load_weights(export(run))
    _same(sd, model.state_dict())  # head.pre_logits.fc.* on disk, pre_logits.fc.* read back
    for fmt in ("timm", "timm-dir", "hf"):
        out = tmp_path / (f"{fmt}.safetensors" if fmt == "timm" else fmt)
        assert main(["export", str(run), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "tanh pre-logits layer (representation_size=32)" in err
        assert "fine-tune it first" in err
        assert not out.exists()
    assert main(["export", str(run), "--timm", "--out", str(tmp_path / "a.safetensors")]) == 2  # the old flag


def test_hf_export_loads_in_transformers_and_comes_back(tmp_path: Path) -> None:
    model = _model()
    x = _x(model.cfg)
    folder = export(_run_dir(tmp_path, model), fmt="hf")
    assert folder == tmp_path / "run" / "export" / "hf" and sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json"]  # README.md: the model card
    torch.testing.assert_close(_hf_logits(folder, x), model(x).detach(), **TOL)
    conf = json.loads((folder / "config.json").read_text())
    assert conf["image_size"] == [48, 64] and conf["id2label"]["3"] == "dog" and conf["layer_norm_eps"] == 1e-6
    ckpt = read_any(folder)  # our config, class names and eval settings ride in the safetensors metadata
    assert ckpt.kind == "hf-folder" and ckpt.config == model.cfg and ckpt.class_names == NAMES
    assert ckpt.eval_settings.mean == (0.5,) * 3
    _same(ckpt.state_dict, model.state_dict())
    evaluated, settings = load_eval_model(folder)
    torch.testing.assert_close(evaluated(x), model(x), **TOL)
    assert settings.crop_pct == 1.0


def test_transformers_own_folders_and_files_load_for_fine_tuning(tmp_path: Path) -> None:
    conf = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                  image_size=32, patch_size=8, num_labels=3, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(conf).eval()
    hf.save_pretrained(tmp_path / "hf")  # transformers' own writer: hub key names, no vitscale metadata
    x = torch.randn(2, 3, 32, 32)
    ckpt = read_any(tmp_path / "hf")
    assert (ckpt.config.heads, ckpt.config.depth, ckpt.config.grid, ckpt.config.num_classes) == (4, 2, (4, 4), 3)
    ours = VisionTransformer(ckpt.config).eval()
    ours.load_state_dict(ckpt.state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(pixel_values=x).logits, **TOL)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")  # model.safetensors.index.json + shards
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _same(read_any(tmp_path / "sharded").state_dict, ckpt.state_dict)
    # its model.safetensors alone (`vit.` keys, heads from read_checkpoint's hint), and transformers 5's
    # in-memory names (vit.layers.N.attention.q_proj) read the same
    sd, cfg, _ = read_checkpoint(tmp_path / "hf" / "model.safetensors", heads=4)
    _same(sd, ckpt.state_dict)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "v5.safetensors"))
    assert any(".q_proj." in k for k in load_file(str(tmp_path / "v5.safetensors")))
    _same(read_checkpoint(tmp_path / "v5.safetensors", heads=4)[0], ckpt.state_dict)
    # a ViTModel (pooler = the tanh pre-logits layer, no classifier): the body loads, the contract holds
    transformers.ViTModel(conf).save_pretrained(tmp_path / "base")
    sd, src, _ = read_checkpoint(tmp_path / "base")
    assert src.representation_size == 64 and src.num_classes == 0
    ft = build_finetune_model(sd, src, finetune_config(src, image_size=48, num_classes=7))
    assert ft.pos_embed.shape == (1, 37, 64) and not ft.head.weight.any()


def test_timm_dir_export_loads_in_timm_with_our_eval_transform(tmp_path: Path) -> None:
    """`export --format timm-dir`: `timm.create_model("local-dir:DIR", pretrained=True)` builds the model (any
    variant, through model_args) with equal logits and the run's eval transform as its data config; our
    readers take the folder back, and a folder written by timm itself (its Hub layout) too."""
    model = _model()
    x = _x(model.cfg)
    folder = export(_run_dir(tmp_path, model), fmt="timm-dir")
    assert folder == tmp_path / "run" / "export" / "timm"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    t = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), **TOL)
    assert timm.data.resolve_data_config(model=t) == {"input_size": (3, 48, 64), "interpolation": "bilinear",
                                                      "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                                                      "crop_mode": "center"}
    assert t.pretrained_cfg["label_names"] == NAMES
    ckpt = read_any(folder)
    assert (ckpt.kind, ckpt.config, ckpt.class_names) == ("timm-folder", model.cfg, NAMES)
    assert ckpt.eval_settings.mean == (0.5,) * 3
    mean_pool = _model(pool="mean")  # timm's global_pool="avg", fc_norm=False
    folder = export(_run_dir(tmp_path / "mean", mean_pool), fmt="timm-dir")
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(x),
                                   mean_pool(x), **TOL)
    own = _timm(model.cfg)  # timm's own Hub writer: no vitscale metadata
    timm.models.save_for_hf(own, str(tmp_path / "own"), safe_serialization=True)
    ckpt = read_any(tmp_path / "own")
    ours = VisionTransformer(ckpt.config).eval()
    ours.load_state_dict(ckpt.state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), own(x), **TOL)
    cfg = own.pretrained_cfg  # timm's recommended transform for the architecture becomes the eval settings
    assert ckpt.eval_settings == EvalSettings(image_size=(48, 64), crop_pct=cfg["crop_pct"], mean=cfg["mean"],
                                              std=cfg["std"], interpolation=cfg["interpolation"])


def _jpeg(w: int, h: int, seed: int) -> bytes:
    """A smooth photo-like JPEG (a resize of noise would compare filters, not the geometry under test)."""
    import io

    from PIL import Image

    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([np.sin(x / 9 + c + seed) * np.cos(y / 13 - c) for c in range(3)], -1) * 100 + 128
    buf = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_hf_export_runs_in_pipeline_with_our_eval_transform(tmp_path: Path) -> None:
    """`export --format hf` writes preprocessor_config.json: transformers' AutoImageProcessor repeats our eval
    transform (resize by crop_pct, centre crop, normalise) within filter differences, and `pipeline()` predicts
    what our model predicts on our own pixels. A Hub folder's processor becomes the eval settings read back."""
    import io

    from PIL import Image

    from data_prep.transforms import center_crop_box, crop_resize_pil, normalize, pil_to_chw

    model, size = _model(image_size=64), (64, 64)
    settings = EvalSettings(image_size=size, crop_pct=0.875, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    folder = save_hf(tmp_path / "hf", model.state_dict(), model.cfg, NAMES, settings)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    classify = transformers.pipeline("image-classification", model=str(folder))
    for i, (w, h) in enumerate([(100, 75), (75, 100), (64, 64), (40, 30), (90, 90)]):
        data = _jpeg(w, h, i)
        ours = {c: normalize(pil_to_chw(crop_resize_pil(data, center_crop_box(w, h, size, c), size, False)),
                             settings.mean, settings.std, torch.float32) for c in (0.875, 1.0)}
        theirs = processor(Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
        assert theirs.shape == ours[0.875].shape
        gap, other = ((theirs - ours[c]).abs().mean().item() for c in (0.875, 1.0))
        assert gap < 0.06 and gap < other / 2, (w, h, gap, other)  # 0.01-0.04 seen; the other crop: 0.08-0.28
        with torch.no_grad():
            want = NAMES[model(ours[0.875][None]).argmax().item()]
        assert classify(Image.open(io.BytesIO(data)))[0]["label"] == want, (w, h)
    assert read_any(folder).eval_settings == settings  # ours: from the weights' metadata
    hub = tmp_path / "hub"  # transformers' own writers: no vitscale metadata, a ViTImageProcessor (no crop)
    transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=3)).save_pretrained(hub)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, resample=3).save_pretrained(hub)
    assert read_any(hub).eval_settings == EvalSettings(image_size=(32, 32), crop_pct=1.0, mean=(0.5,) * 3,
                                                       std=(0.5,) * 3, interpolation="bicubic")
    (hub / "preprocessor_config.json").write_text(json.dumps(
        {"size": 256, "crop_size": 224, "do_center_crop": True, "image_mean": [0.1] * 3, "image_std": [0.2] * 3}))
    assert read_any(hub).eval_settings.crop_pct == 0.875  # an older file: sizes as ints
    (hub / "preprocessor_config.json").unlink()
    assert read_any(hub).eval_settings is None  # no processor: our defaults apply


# B/16 whole (12 blocks: two-digit block indices in every key format); L/16 with its width, heads and MLP at 224 px
# but 4 of its 24 blocks: every block goes through the same conversion, and the whole L/16 was ~25 s of compute
@pytest.mark.slow  # real-size models, ~8 s each (make test-quick keeps the B/16 export tests)
@pytest.mark.parametrize(("variant", "depth"), [("B/16", None), ("L/16", 4)])
def test_real_shapes_ours_timm_transformers(variant: str, depth: int | None, tmp_path: Path) -> None:
    """The paper's B/16 and L/16 shapes at 224 px: ours -> file -> timm, ours -> hf -> transformers -> ours."""
    model = _model(variant, depth=depth, image_size=224)
    x = _x(model.cfg)
    with torch.no_grad():
        want = model(x)
        path = save_weights(tmp_path / "m.safetensors", model.state_dict(), model.cfg, NAMES)
        with torch.device("meta"):  # no init of 300 M weights that the strict load replaces
            t = _timm(model.cfg)
        t.load_state_dict(load_file(str(path)), strict=True, assign=True)
        torch.testing.assert_close(t(x), want, **TOL)
        del t
        folder = save_hf(tmp_path / "hf", model.state_dict(), model.cfg, NAMES)
        torch.testing.assert_close(_hf_logits(folder, x), want, **TOL)
        ckpt = read_any(folder)  # back exactly (a stronger check than a third forward at 1e-4)
        assert ckpt.config == model.cfg and ckpt.class_names == NAMES
        _same(ckpt.state_dict, model.state_dict())


def test_augreg_npz_round_trip_and_timm_reads_it(tmp_path: Path) -> None:
    model = _model(image_size=48)
    x = _x(model.cfg)
    path = save_npz(tmp_path / "augreg.npz", model.state_dict(), model.cfg, layout="augreg")
    assert identify_weights(path).kind == "bv-npz"
    ckpt = read_any(path)
    assert ckpt.config == model.cfg.replace(norm_eps=1e-6)
    _same(ckpt.state_dict, model.state_dict())  # the class token's position stays in pos_embedding: exact
    # big_vision feeds its ViTs pixels in [-1, 1]: eval and fine-tuning normalise so, not with ImageNet's stats
    ev = ckpt.eval_settings
    assert (ev.mean, ev.std, ev.image_size) == ((0.5,) * 3, (0.5,) * 3, (48, 48))
    t = _timm(model.cfg)
    t.load_pretrained(str(path))  # timm's own .npz loader
    _same(t.state_dict(), to_timm(model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(t(x), model(x), **TOL)


def test_big_vision_npz_stacked_or_not_and_timm_reads_it(tmp_path: Path) -> None:
    model = _model(image_size=48, representation_size=16)
    x = _x(model.cfg)
    path = save_npz(tmp_path / "bv.npz", model.state_dict(), model.cfg, layout="big_vision")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    assert arrays["pos_embedding"].shape == (1, 9, 768) and "pre_logits/kernel" in arrays
    stacked = {k: v for k, v in arrays.items() if not k.startswith("Transformer/encoderblock_")}
    for k in (k for k in arrays if k.startswith("Transformer/encoderblock_0/")):
        rest = k.removeprefix("Transformer/encoderblock_0/")
        stacked["params/Transformer/encoderblock/" + rest] = np.stack(
            [arrays[f"Transformer/encoderblock_{i}/{rest}"] for i in range(model.cfg.depth)])
    stacked = {("" if k.startswith("params/") else "params/") + k: v for k, v in stacked.items()}
    np.savez(tmp_path / "stacked.npz", **stacked)
    for p in (path, tmp_path / "stacked.npz"):
        ckpt = read_any(p)  # cls + its position folded together: the same function, not the same tensors
        back = VisionTransformer(ckpt.config).eval()
        back.load_state_dict(ckpt.state_dict, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(back(x), model(x), **TOL)
    plain = _model(image_size=48)
    save_npz(tmp_path / "plain.npz", plain.state_dict(), plain.cfg, layout="big_vision")
    t = _timm(plain.cfg, no_embed_class=True)  # big_vision adds positions before the class token, as this does
    t.load_pretrained(str(tmp_path / "plain.npz"))
    with torch.no_grad():
        torch.testing.assert_close(t(x), plain(x), **TOL)


def assert_one_line(path: Path, *fragments: str, build: bool = False) -> None:
    with pytest.raises(ConfigError) as info:
        sd, src, _ = read_checkpoint(path, heads=12)
        if build:
            build_finetune_model(sd, src, finetune_config(src, image_size=64, num_classes=2))
    msg = str(info.value)
    assert "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, (frag, msg)


def test_bad_files_are_one_line_config_errors(tmp_path: Path) -> None:
    model = _model(image_size=48)
    arrays = to_big_vision(model.state_dict(), model.cfg)
    gap = {k: v for k, v in arrays.items() if k != "cls"}
    np.savez(tmp_path / "gap.npz", **gap)
    assert_one_line(tmp_path / "gap.npz", "without a class token (pool_type 'gap')", "avg-pool", "pool_type 'tok'")
    short = {k: v for k, v in arrays.items() if "encoderblock_1/MlpBlock_3/Dense_1" not in k}
    np.savez(tmp_path / "short.npz", **short)
    assert_one_line(tmp_path / "short.npz", "big_vision/AugReg ViT .npz", "lacks Transformer/encoderblock_1/MlpBlock_3")
    np.savez(tmp_path / "extra.npz", **arrays, **{"Transformer/encoderblock_0/LayerScale_0/scale": np.ones(768)})
    assert_one_line(tmp_path / "extra.npz", "parameters vitscale's ViT lacks: Transformer/encoderblock_0/LayerScale_0")
    np.savez(tmp_path / "objects.npz", **arrays, extra=np.array([{"a": 1}], dtype=object))  # pickled member
    assert_one_line(tmp_path / "objects.npz", "cannot be read", "allow_pickle")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["blocks.1.attn.qkv.weight"] = sd["blocks.1.attn.qkv.weight"][:-3]  # wrong shape
    save_file(sd, str(tmp_path / "shape.safetensors"))
    assert_one_line(tmp_path / "shape.safetensors", "shapes do not fit the model: blocks.1.attn.qkv.weight", build=True)
    del sd["blocks.1.attn.qkv.weight"]  # a missing key: the contract names it
    save_file(sd, str(tmp_path / "missing.safetensors"))
    assert_one_line(tmp_path / "missing.safetensors", "loading contract broken: missing ['blocks.1.attn.qkv.weight']",
              build=True)
    folder = save_hf(tmp_path / "deit", model.state_dict(), model.cfg)
    (folder / "config.json").write_text(json.dumps({"model_type": "deit"}))
    assert_one_line(folder, "model_type 'deit', not 'vit'")
    hf = load_file(str(folder / "model.safetensors"))
    save_file({**hf, "vit.embeddings.mask_token": torch.zeros(1, 1, 768)}, str(tmp_path / "mim.safetensors"))
    assert_one_line(tmp_path / "mim.safetensors", "vit.embeddings.mask_token has no place")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert_one_line(folder, "pytorch_model.bin): a pickle", "save_pretrained")
