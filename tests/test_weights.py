"""Weight files: metadata, atomic writes, resolution change on load, and refusal of foreign files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from data_prep import transforms
from vit import VisionTransformer, vit_config
from vit.weights import (
    FORMAT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalSettings,
    load_model,
    load_weights,
    read_metadata,
    save_weights,
)


def test_round_trip_with_metadata(tmp_path: Path) -> None:
    cfg = vit_config("debug", representation_size=16, num_classes=3)
    model = VisionTransformer(cfg)
    path = save_weights(tmp_path / "export" / "model.safetensors", model.state_dict(), cfg,
                        class_names=["cat", "dog", "owl"], step=42)
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp file left
    sd, meta = load_weights(path)
    assert meta["config"] == cfg and meta["class_names"] == ["cat", "dog", "owl"] and meta["step"] == 42
    assert meta["image_size"] == (32, 32)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_load_model_at_higher_resolution(tmp_path: Path) -> None:
    cfg = vit_config("debug")
    model = VisionTransformer(cfg)
    path = save_weights(tmp_path / "m.safetensors", model.state_dict(), cfg)
    big = load_model(path, image_size=64)
    assert big.cfg.grid == (8, 8) and big.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(big.pos_embed[:, 0], model.pos_embed[:, 0])  # class token kept apart
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    same = load_model(path)
    assert torch.equal(same.pos_embed, model.pos_embed)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a vitscale weight file"):
        read_metadata(path)


def test_metadata_is_plain_json(tmp_path: Path) -> None:
    cfg = vit_config("debug")
    path = save_weights(tmp_path / "m.safetensors", VisionTransformer(cfg).state_dict(), cfg)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == FORMAT
    assert json.loads(header["__metadata__"]["config"])["patch_size"] == 8


def test_eval_settings_round_trip(tmp_path: Path) -> None:
    cfg = vit_config("debug")
    want = EvalSettings(image_size=(32, 48), crop_pct=1.0, interpolation="bicubic", mean=(0.5, 0.5, 0.5),
                        std=(0.25, 0.25, 0.25))
    path = save_weights(tmp_path / "m.safetensors", VisionTransformer(cfg).state_dict(), cfg, eval_settings=want)
    got = read_metadata(path)["eval"]
    assert got == want and isinstance(got.image_size, tuple) and got.crop_pct == 1.0
    assert load_weights(path)[1]["eval"] == want
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    stored = json.loads(json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"]["eval"])
    assert stored["image_size"] == [32, 48] and stored["interpolation"] == "bicubic"  # plain JSON
    assert EvalSettings(image_size=24) == EvalSettings(image_size=(24, 24))


def test_old_file_without_eval_reads_defaults(tmp_path: Path) -> None:
    cfg = vit_config("debug", image_size=(16, 24))
    sd = VisionTransformer(cfg).state_dict()
    old = {"format": FORMAT, "config": cfg.to_json(), "image_size": "[16, 24]", "class_names": "[]", "step": "7"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "old.safetensors"), metadata=old)
    sd2, meta = load_weights(tmp_path / "old.safetensors")
    assert meta["step"] == 7 and meta["config"] == cfg and torch.equal(sd2["pos_embed"], sd["pos_embed"])
    ev = meta["eval"]
    assert ev == EvalSettings(image_size=(16, 24), crop_pct=0.875, interpolation="bilinear")
    # The defaults are the stream's eval transform (copied into vit/, which does not import data_prep).
    assert (ev.mean, ev.std) == (IMAGENET_MEAN, IMAGENET_STD) == (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    assert "eval" not in json.loads(path_header(save_weights(tmp_path / "n.safetensors", sd, cfg)))


def path_header(path: Path) -> str:
    """The JSON metadata of a safetensors file."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return json.dumps(json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"])


@pytest.mark.parametrize("bad", [dict(crop_pct=0.0), dict(crop_pct=1.5), dict(interpolation="lanczos"),
                                 dict(std=(0.0, 1.0, 1.0)), dict(mean=(0.5,))])
def test_bad_eval_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="eval"):
        EvalSettings(image_size=(32, 32), **bad)


def test_eval_settings_with_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="bad eval settings"):
        EvalSettings.from_json(json.dumps({"image_size": [32, 32], "crop_fraction": 1.0}))
    with pytest.raises(ValueError, match="bad eval settings"):
        EvalSettings.from_json(json.dumps({"crop_pct": 1.0}))
