"""Where an export (or another verb's output) goes: an `--out` that cannot take it is refused before any work, with
the fix; `--tag` names the checkpoints there are; a failed write leaves neither a half file nor a temporary one,
and keeps the old file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runtime.config import ConfigError
from trainer import checkpoint as ckpt
from trainer.export import export
from vit import VisionTransformer, vit_config
from vit.interop import save_hf, save_npz, save_timm_dir
from vit.weights import load_weights, save_weights


def _run_with_tags(tmp_path: Path, *tags: str) -> Path:
    """A run dir whose checkpoint folders are complete as far as listing goes (a trainer_state.json each)."""
    run = tmp_path / "run"
    for tag in tags:
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / tag / ckpt.STATE_FILE).write_text("{}")
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run


@pytest.mark.parametrize("fmt,out,named", [
    ("vitscale", "folder", "is a folder; pass a file name, e.g. {out}/model.safetensors"),
    ("vitscale", "weights.pth", "name it weights.safetensors"),
    ("timm", "weights", "name it weights.safetensors"),
    ("vitscale", "a-file/w.safetensors", "a-file is a file, not a folder; pass another --out"),
    ("hf", "a-file", "is a file; this writes a folder of files: pass a folder"),
    ("hf", "a-file/hf", "a-file is a file, not a folder; pass another --out"),
])
def test_an_out_that_cannot_take_the_export_is_refused_first(tmp_path: Path, fmt: str, out: str, named: str) -> None:
    """Refused before the checkpoint is read (the run dir here has none): an export into a folder was an
    IsADirectoryError after minutes of consolidating, and left its temporary file beside it."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("mine")
    dest = tmp_path / out
    with pytest.raises(ConfigError, match=f"--out {dest}") as err:
        export(_run_with_tags(tmp_path), dest, fmt=fmt)
    assert named.format(out=dest) in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "folder", "run"]
    assert (tmp_path / "a-file").read_text() == "mine" and not any((tmp_path / "folder").iterdir())


def test_a_tag_that_is_not_there_names_the_ones_that_are(tmp_path: Path) -> None:
    run = _run_with_tags(tmp_path, "global_step20", "global_step100", "global_step5")
    (run / "checkpoints" / "global_step200").mkdir()  # unfinished: no trainer_state.json, not offered
    with pytest.raises(ConfigError, match="no complete checkpoint global_step200; it has global_step5, "
                                          "global_step20, global_step100: pass one of those to --tag"):
        export(run, tmp_path / "w.safetensors", tag="global_step200")
    with pytest.raises(ConfigError, match="holds no complete checkpoint .* train first"):
        export(_run_with_tags(tmp_path / "empty"), tmp_path / "w.safetensors")


@pytest.mark.parametrize("writer", ["vitscale", "hf", "timm-dir", "npz"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, monkeypatch, writer: str) -> None:
    """A full disk mid-write: the file that was there stays whole and nothing else is left in the folder."""
    cfg = vit_config("debug", image_size=32, num_classes=3)
    sd = VisionTransformer(cfg).state_dict()
    target = {"vitscale": tmp_path / "w.safetensors", "hf": tmp_path / "hf", "timm-dir": tmp_path / "timm",
              "npz": tmp_path / "w.npz"}[writer]
    write = {"vitscale": lambda: save_weights(target, sd, cfg, ["a", "b", "c"]),
             "hf": lambda: save_hf(target, sd, cfg, ["a", "b", "c"]),
             "timm-dir": lambda: save_timm_dir(target, sd, cfg, ["a", "b", "c"], 3),
             "npz": lambda: save_npz(target, sd, cfg)}[writer]
    write()
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        Path(args[1] if len(args) > 1 else args[0].name).write_bytes(b"half")  # part of a file, then the error
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("numpy.savez", disk_full)
    monkeypatch.setattr("vit.weights.save_file", lambda t, path, metadata: disk_full(t, path))
    monkeypatch.setattr("vit.interop.save_file", lambda t, path, metadata: disk_full(t, path))
    with pytest.raises(OSError, match="No space left"):
        write()
    after = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    if writer == "vitscale":
        assert torch.equal(load_weights(target)[0]["head.weight"], sd["head.weight"])


@pytest.mark.parametrize("verb", ["fewshot", "linear-probe", "preview", "inspect"])
def test_the_other_verbs_check_their_output_path_first(verb: str, digits_shards: Path, tmp_path: Path,
                                                       capsys) -> None:
    """A folder where a file goes (or the reverse) was an IsADirectoryError / FileExistsError traceback after the
    verb's work (minutes of feature extraction for fewshot)."""
    from data_prep.__main__ import main as data_prep_main
    from finetune.__main__ import main as finetune_main
    from vit.__main__ import main as vit_main

    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("mine")
    folder, file = tmp_path / "folder", tmp_path / "a-file"
    argv, want = {
        "fewshot": (["fewshot", "w.safetensors", f"data.path={digits_shards}", f"out={folder}"],
                    f"error: out={folder} is a folder; pass a file name"),
        "linear-probe": (["linear-probe", "w.safetensors", f"data.path={digits_shards}", f"out={file}/r.json"],
                         f"error: out={file}/r.json: {file} is a file, not a folder; pass another out"),
        "preview": (["preview", str(digits_shards.parent), "--out", str(folder)],
                    f"error: --out {folder} is a folder; pass a file name"),
        "inspect": (["inspect", "w.safetensors", "--out", str(file)],
                    f"error: --out {file} is a file; this writes a folder of files: pass a folder"),
    }[verb]
    main = {"preview": data_prep_main, "inspect": vit_main}.get(verb, finetune_main)
    assert main(argv) == 2
    assert capsys.readouterr().err == want + "\n"
    assert file.read_text() == "mine" and not any(folder.iterdir())
