"""Unreadable `init=` files: each is one ConfigError line that names what was found and the fix.

Every case is a small file built here (real timm models where the key names matter); nothing is unpickled:
the pickles carry a payload that would create a marker file if it ever ran.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from finetune.load import describe_init, read_checkpoint
from runtime.config import ConfigError
from tests.stage_fixtures import accelerate_run_dir
from vit import VisionTransformer, vit_config
from vit.weights import describe_state_dict, identify_weights, save_weights

timm = pytest.importorskip("timm")


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _timm_file(path: Path, **kwargs) -> Path:
    """A real timm ViT (1 block, 32 px) saved as safetensors."""
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3, **kwargs)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    return path


def assert_refused(path: Path, *fragments: str) -> str:
    """read_checkpoint(path) must raise one ConfigError line starting with the path and holding `fragments`."""
    with pytest.raises(ConfigError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


def test_plain_timm_vit_loads_and_its_variants_are_named(tmp_path: Path) -> None:
    sd, cfg, _ = read_checkpoint(_timm_file(tmp_path / "plain.safetensors"), heads=3)  # the positive control
    assert (cfg.width, cfg.depth, cfg.patch_size, cfg.grid) == (192, 1, 16, (2, 2)) and "patch_embed.weight" in sd
    assert_refused(_timm_file(tmp_path / "avg.safetensors", global_pool="avg", fc_norm=True),
             "avg-pool head with fc_norm: not a cls-token ViT", "global_pool='token'")
    for kwargs, part in [(dict(init_values=1e-5), "layer-scale (blocks.*.ls1/ls2"),
                         (dict(reg_tokens=2), "register tokens (reg_token)"),
                         (dict(qk_norm=True), "q_norm/k_norm"),
                         (dict(global_pool="map"), "attention-pool head (attn_pool"),
                         (dict(pre_norm=True), "(norm_pre"),
                         (dict(class_token=False, global_pool="avg", fc_norm=False), "without a class token")]:
        name = "_".join(f"{k}{v}" for k, v in kwargs.items())
        assert_refused(_timm_file(tmp_path / f"{name}.safetensors", **kwargs), part)


def test_hugging_face_files_and_folders_that_do_not_load(tmp_path: Path) -> None:
    """transformers ViT files and folders load (tests/test_interop.py); broken ones and other families are named."""
    keys = ["vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
            "vit.embeddings.patch_embeddings.projection.weight",
            "vit.encoder.layer.0.attention.attention.query.weight", "classifier.weight"]
    path = tmp_path / "hf.safetensors"
    save_file({k: torch.zeros(2) for k in keys}, str(path))
    assert_refused(path, "is a Hugging Face transformers ViT state dict, but", "lacks one of query/key/value")
    deit = tmp_path / "deit.safetensors"
    save_file({k.replace("vit.", "deit.") if k.startswith("vit.") else k: torch.zeros(2) for k in keys}, str(deit))
    assert_refused(deit, "Hugging Face transformers deit model (keys like deit.embeddings.", "not a plain ViT",
             "model_type 'vit'")
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 2}))
    save_file({k: torch.zeros(2) for k in keys}, str(folder / "model.safetensors"))
    assert_refused(folder, "Hugging Face transformers model folder (config.json + model.safetensors), but")
    (folder / "config.json").write_text(json.dumps({"model_type": "beit"}))
    assert_refused(folder, "of model_type 'beit', not 'vit'")
    # A timm model folder (the Hub's layout) loads when its file does; else both are named.
    hub = tmp_path / "timm_hub"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224"}))
    _timm_file(hub / "model.safetensors")
    assert identify_weights(hub).kind == "timm-folder" and read_checkpoint(hub)[1].depth == 1
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, str(hub / "model.safetensors"))
    assert_refused(hub, "is a timm model folder (vit_tiny_patch16_224) whose model.safetensors", "conv1.weight")


def test_no_vit_keys_names_what_it_saw(tmp_path: Path) -> None:
    resnet = {"conv1.weight": torch.zeros(4, 3, 3, 3), "bn1.weight": torch.ones(4), "bn1.running_mean": torch.zeros(4),
              "layer1.0.conv1.weight": torch.zeros(4, 4, 3, 3), "fc.weight": torch.zeros(2, 4)}
    save_file(resnet, str(tmp_path / "resnet.safetensors"))
    msg = assert_refused(tmp_path / "resnet.safetensors", "has no ViT keys (saw e.g. ", "conv1.weight")
    assert "running_mean" not in msg  # weights named before buffers
    save_file({}, str(tmp_path / "none.safetensors"))
    assert_refused(tmp_path / "none.safetensors", "without tensors")


def test_npz_without_a_vit_is_named(tmp_path: Path) -> None:
    """big_vision/AugReg ViT .npz files load (tests/test_interop.py); other archives are named."""
    bv = tmp_path / "partial.npz"
    np.savez(bv, **{"Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": np.zeros(2), "cls": np.zeros(2)})
    assert_refused(bv, "a NumPy .npz archive without ViT parameters (saw Transformer/encoderblock_0/",
                   "embedding/kernel")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    assert_refused(tmp_path / "other.npz", "a NumPy .npz archive without ViT parameters (saw a)")
    np.savez(tmp_path / "map.npz", **{"embedding/kernel": np.zeros(2), "MAPHead_0/probe": np.zeros(2)})
    assert_refused(tmp_path / "map.npz", "without a class token (pool_type 'map')")


@pytest.mark.parametrize("how", ["zip", "legacy", "protocol0"])
def test_pickles_are_refused_without_unpickling(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / ("renamed.safetensors" if how == "legacy" else "model.pth")  # legacy: told by its magic byte
    obj = {"state_dict": {"w": torch.zeros(2)}, "x": Payload(marker)}
    if how == "protocol0":  # no magic byte: told by the extension once safetensors cannot parse it
        path.write_bytes(pickle.dumps({"x": Payload(marker)}, protocol=0))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=how == "zip")
    assert_refused(path, "is not a safetensors file but a pickled", "refused: unpickling can run code",
             "safetensors.torch.save_file")
    assert not marker.exists()


def test_missing_empty_garbage_folder_and_run_dir(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope.safetensors", "does not exist", "pass the path of a .safetensors weight file")
    (tmp_path / "empty.safetensors").touch()
    assert_refused(tmp_path / "empty.safetensors", "is empty (0 bytes)")
    (tmp_path / "notes.safetensors").write_text("hello, not weights")
    assert_refused(tmp_path / "notes.safetensors", "is not a safetensors file (")
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    assert_refused(folder, "folder without a known layout (holds readme.txt)", "pass a .safetensors file")
    _timm_file(folder / "w.safetensors")
    assert_refused(folder, "folder without a known layout", f"pass the weight file inside ({folder}/w.safetensors)")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    assert describe_init(run).kind == "run-dir" and identify_weights(run).kind == "folder"
    assert_refused(run, "holds no complete checkpoint", "train first")  # a run dir without a checkpoint yet


def test_run_dir_is_consolidated_in_process(tmp_path: Path) -> None:
    """A training run dir as init=: its latest checkpoint is read in-process (no exported file is written)."""
    cfg = vit_config("debug", image_size=32, num_classes=3)
    torch.manual_seed(0)
    sd = VisionTransformer(cfg).state_dict()
    run = accelerate_run_dir(tmp_path / "run", sd, cfg, ["a", "b", "c"], step=7)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    got, got_cfg, names = read_checkpoint(run)
    assert got_cfg == cfg and names == ["a", "b", "c"] and got.keys() == sd.keys()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written into the run dir
    (run / "checkpoints" / "latest").write_text("global_step9")  # `latest` names a tag that is not there
    assert_refused(run, "names 'global_step9' but", "trainer_state.json is missing")


def test_damaged_files_of_known_formats(tmp_path: Path) -> None:
    cfg = vit_config("debug")
    good = save_weights(tmp_path / "m.safetensors", VisionTransformer(cfg).state_dict(), cfg)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])  # a download that stopped early
    assert_refused(cut, "is not a safetensors file (")
    bad_meta = tmp_path / "bad_meta.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad_meta), metadata={"format": "vitscale-vit/1", "config": "{not json"})
    assert_refused(bad_meta, "is a vitscale weight file but cannot be read", "re-export")


def test_describe_state_dict_is_the_one_classifier() -> None:
    assert describe_state_dict([], {"format": "vitscale-vit/1"}).loadable
    ours = ["cls_token", "pos_embed", "patch_embed.weight", "blocks.0.attn.qkv.weight", "norm.weight"]
    assert describe_state_dict(ours).kind == "timm-vit"  # vitscale key names without metadata load as before
    fmt = describe_state_dict(ours + ["dist_token"])
    assert fmt.kind == "timm-unsupported" and "distillation token" in fmt.found and not fmt.loadable
    bert = ["bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight"]
    assert describe_state_dict(bert).kind == "not-vit"  # a text transformer is not called a ViT
