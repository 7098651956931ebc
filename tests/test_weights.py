"""Weight files: metadata, atomic writes, resolution change on load, and refusal of foreign files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vit import VisionTransformer, vit_config
from vit.weights import FORMAT, load_model, load_weights, read_metadata, save_weights


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
