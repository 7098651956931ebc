"""`python -m data_prep` on bad input, in-process: an empty source is refused before OUT exists, a folder
without shards is named with the fix (never a raw errno), and every verb's --help shows its defaults."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep.__main__ import build_parser, main


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _empty_sources(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (source, what its error line must say it expected)."""
    (tmp / "no-classes").mkdir(parents=True)
    (tmp / "empty-classes" / "cat").mkdir(parents=True)
    (tmp / "header.csv").write_text("path,label\n")
    (tmp / "blank.jsonl").write_text("\n\n")
    (tmp / "shards").mkdir()
    _tar(tmp / "shards" / "train-000000.tar", {})
    return {
        "folder without class folders": (tmp / "no-classes", "expected"),
        "class folders without files": (tmp / "empty-classes", "expected"),
        "csv with a header only": (tmp / "header.csv", "expected one row per image"),
        "jsonl without rows": (tmp / "blank.jsonl", "expected one row per image"),
        "empty tar": (_tar(tmp / "empty.tar", {}), "expected image members"),
        # listed (and its listing cached under OUT/.parts) before the labels turn out missing
        "flat tar without labels": (_tar(tmp / "flat.tar", {"a.png": _png()}), "--labels"),
        "shards without samples": (tmp / "shards", "expected images with a label"),
    }


def test_a_missing_labels_file_is_named_and_leaves_no_output(tmp_path, capsys):
    src, labels = _tar(tmp_path / "flat.tar", {"a.png": _png()}), tmp_path / "labels.csv"
    assert main(["write", str(src), str(tmp_path / "out"), "--labels", str(labels), "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Errno" not in err and f"--labels {labels} does not exist" in err, err
    assert not (tmp_path / "out").exists()


def test_an_empty_source_is_refused_and_leaves_no_output(tmp_path, capsys):
    for name, (src, expected) in _empty_sources(tmp_path / "src").items():
        out = tmp_path / "new" / "out"
        assert main(["write", str(src), str(out), "--workers", "1", "--no-progress"]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(src) in err and expected in err, (name, err)
        assert not (tmp_path / "new").exists(), f"{name}: {sorted((tmp_path / 'new').rglob('*'))}"


def test_an_existing_output_folder_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    src = _tar(tmp_path / "flat.tar", {"a.png": _png()})
    assert main(["write", str(src), str(out), "--workers", "1", "--no-progress"]) == 2
    assert "--labels" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("verb", ["stats", "verify", "preview", "merge"])
def test_a_folder_without_shards_is_named_with_the_fix(verb, tmp_path, capsys):
    extra = ["--out", str(tmp_path / "grid.png")] if verb == "preview" else []
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        code = main([verb, str(folder), *extra])
        captured = capsys.readouterr()
        line = (captured.err + captured.out).strip().splitlines()[0]
        assert code == (1 if verb == "verify" else 2), (verb, folder, line)
        assert "Errno" not in line and str(folder) in line and "python -m data_prep write" in line, line
    assert not (tmp_path / "grid.png").exists()


def test_foreign_shards_without_dataset_json_point_at_write(tmp_path, capsys):
    _tar(tmp_path / "train-000000.tar", {})
    assert main(["stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no dataset.json" in err and f"python -m data_prep write {tmp_path} OUT" in err, err


def test_an_unfinished_write_points_at_rerun_or_merge(tmp_path, capsys):
    (tmp_path / ".parts").mkdir()
    (tmp_path / ".parts" / "plan.json").write_text("{}")
    assert main(["stats", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "did not finish" in err and f"python -m data_prep merge {tmp_path}" in err, err


BROKEN_MANIFESTS = {  # dataset.json text -> what the one line must say
    "{}": "format None is not 'vitscale-shards/1'",
    "[1, 2]": "format 'list' is not 'vitscale-shards/1'",
    '{"format": "vitscale-shards/1", "splits": 3}': "`splits` or `classes` is not in the shape data_prep writes",
    '{"format": "vitscale-shards/1", "splits": {"train": {"shards": [{"name": 1}]}}}': "is not in the shape",
    "nojson": "is not valid JSON",
}


@pytest.mark.parametrize("text", BROKEN_MANIFESTS, ids=["empty", "list", "splits_int", "shard_name", "not_json"])
def test_a_foreign_or_edited_dataset_json_is_one_line_for_every_reader(text, tmp_path, capsys):
    """stats, preview, write from shards (exit 2) and verify (the one problem, exit 1) name the file and the fix;
    they raised KeyError/TypeError tracebacks (a JSON file that is not the shard contract)."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(text)
    want = BROKEN_MANIFESTS[text]
    for argv, code in [(["stats", "ds"], 2), (["preview", "ds", "--out", "g.png"], 2), (["verify", "ds"], 1),
                       (["write", "ds/dataset.json", "out"], 2)]:
        args = [str(tmp_path / a) if a in ("ds", "ds/dataset.json", "out", "g.png") else a for a in argv]
        assert main(args) == code, argv
        captured = capsys.readouterr()
        line = (captured.err + captured.out).strip().splitlines()[0]
        assert want in line and "dataset.json" in line and "python -m data_prep" in line, (argv, line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "g.png").exists()


def test_every_option_shows_its_default():
    sub = next(a for a in build_parser()._actions if a.choices and "write" in a.choices).choices
    for verb, parser in sub.items():
        fmt = parser.formatter_class(parser.prog)
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                assert "default" in fmt._get_help_string(action), (verb, action.dest)
    write = " ".join(sub["write"].format_help().split())
    for shown in ("(default: 1000)", "(default: auto)", "(default: 90)", "(default 10: measured"):
        assert shown in write, shown
