"""Listing sources: ImageFolder trees and CSV/JSONL lists, and the errors that name the file and line."""

from __future__ import annotations

import json

import pytest

from data_prep.__main__ import main
from data_prep.sources import SourceError, list_source


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_image_folder_listing(tmp_path):
    for rel in ("10/a.jpg", "2/b/c/deep.png", "2/a.jpg", "2/.hidden.jpg", "2/.cache/x.jpg", "readme.txt",
                ".git/HEAD", "empty_class/.keep"):
        _touch(tmp_path / rel)
    listing = list_source(tmp_path)
    assert listing.classes == ["2", "10"]  # numeric names sort as numbers; an empty class gets no index
    assert listing.paths == ["2/a.jpg", "2/b/c/deep.png", "10/a.jpg"]  # nested kept, hidden and root files not
    assert listing.labels.tolist() == [0, 0, 1]
    assert listing.split_ids is None


def test_pool_map_gives_the_same_listing(tmp_path):
    for c in ("cat", "dog", "emu"):
        for i in range(3):
            _touch(tmp_path / c / f"{i}.jpg")
    from data_prep.pool import worker_pool

    with worker_pool(2) as (imap, _):
        parallel = list_source(tmp_path, map_fn=imap)
    serial = list_source(tmp_path)
    assert parallel.paths == serial.paths and parallel.classes == serial.classes == ["cat", "dog", "emu"]


def test_csv_and_jsonl_lists(tmp_path):
    (tmp_path / "l.csv").write_text("path,label,split\nimgs/a.jpg,cat,train\n\nimgs/b.jpg,dog,val\n"
                                    f"{tmp_path}/c.jpg,cat,test\n")
    listing = list_source(tmp_path / "l.csv")
    assert listing.root == tmp_path
    assert listing.paths == ["imgs/a.jpg", "imgs/b.jpg", f"{tmp_path}/c.jpg"]
    assert listing.classes == ["cat", "dog"] and listing.labels.tolist() == [0, 1, 0]
    assert listing.split_names == ("train", "val", "test")
    assert listing.split_ids.tolist() == [0, 1, 2]
    rows = [{"path": "a.png", "label": 3}, {"path": "b.png", "label": 12}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    listing = list_source(tmp_path / "l.jsonl")
    assert listing.classes == ["3", "12"] and listing.split_ids is None


@pytest.mark.parametrize(("name", "text", "match"), [
    ("bad.csv", "path,label\na.jpg,cat\nb.jpg\n", r"bad\.csv:3: 1 fields"),
    ("bad.csv", "path,label\na.jpg,\n", r"bad\.csv:2: missing or empty `label`"),
    ("bad.csv", "file,label\na.jpg,cat\n", r"bad\.csv:1: header .* lacks \['path'\]"),
    ("bad.csv", "path,label,split\na.jpg,cat,train\nb.jpg,cat,\n", r"bad\.csv:3: row has no split"),
    ("bad.csv", "path,label,split\na.jpg,cat,tr-ain\n", r"bad\.csv:2: split 'tr-ain'"),
    ("bad.csv", "", r"bad\.csv is empty"),
    ("bad.jsonl", '{"path": "a.jpg", "label": 1}\n{"path": "b.jpg", "label": 1\n', r"bad\.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"label": 1}\n', r"bad\.jsonl:1: missing or empty `path`"),
    ("bad.jsonl", "\n\n", r"bad\.jsonl lists no images"),
])
def test_bad_lists_name_file_and_line(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(SourceError, match=match):
        list_source(tmp_path / name)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_lists_saved_by_spreadsheets_read_like_plain_ones(tmp_path, suffix):
    """A UTF-8 byte order mark (Excel's "CSV UTF-8") and CRLF line ends list the same images; the mark made the
    header `\ufeffpath` and the list was refused."""
    rows = ([{"path": "imgs/é 1,x.jpg", "label": "dög"}, {"path": "imgs/b.jpg", "label": "cat"}])
    text = ("path,label\n" + "".join(f'"{r["path"]}",{r["label"]}\n' for r in rows) if suffix == ".csv"
            else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / f"plain{suffix}").write_text(text, encoding="utf-8")
    (tmp_path / f"excel{suffix}").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    plain, excel = list_source(tmp_path / f"plain{suffix}"), list_source(tmp_path / f"excel{suffix}")
    assert excel.paths == plain.paths == ["imgs/é 1,x.jpg", "imgs/b.jpg"]
    assert excel.classes == plain.classes and excel.labels.tolist() == plain.labels.tolist()


def test_a_list_that_is_not_utf8_names_the_file_and_the_fix(tmp_path, capsys):
    (tmp_path / "latin1.csv").write_bytes("path,label\nimgs/été.jpg,1\n".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1\.csv: not UTF-8 text \(byte 0xe9 at offset 16\); save it as UTF-8"):
        list_source(tmp_path / "latin1.csv")
    (tmp_path / "names.txt").write_bytes("n01 chien\nn02 cha\xeet\n".encode("latin-1"))
    (tmp_path / "cls" / "n01").mkdir(parents=True)
    assert main(["write", str(tmp_path / "cls"), str(tmp_path / "out"), "--class-names", str(tmp_path / "names.txt"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--class-names {tmp_path / 'names.txt'}: not UTF-8 text" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_unusable_sources(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_source(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    _touch(tmp_path / "flat" / "a.jpg")
    with pytest.raises(SourceError, match="no class folders"):
        list_source(tmp_path / "flat")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(SourceError, match="no files"):
        list_source(tmp_path / "empty")
    _touch(tmp_path / "list.txt")
    with pytest.raises(SourceError, match="not a .csv or .jsonl"):
        list_source(tmp_path / "list.txt")


def test_cli_reports_a_missing_source_or_an_output_inside_it(tmp_path, capsys):
    assert main(["write", str(tmp_path / "nope"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(tmp_path / "nope") in err
    _touch(tmp_path / "src" / "cat" / "a.jpg")
    assert main(["write", str(tmp_path / "src"), str(tmp_path / "src" / "shards"), "--no-progress"]) == 2
    assert "inside the source tree" in capsys.readouterr().err
    assert not (tmp_path / "src" / "shards").exists()
