"""Hugging Face `datasets`-style parquet sources, written with pyarrow in the test from scikit-learn's digits:
an image struct (bytes + path) and an int label named by the ClassLabel metadata, or raw bytes + string
labels under other column names; a missing column is one clear line and nothing is written."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import write_shards
from data_prep.__main__ import main
from data_prep.examples import load_digits
from tests.data_prep_fixtures import output_files
from tests.test_data_prep_archives import read_shards

NAMES = ["zebra", "ant", "cow"]  # the dataset's own order, not sorted: class i must stay class i


def _png(k: int) -> bytes:
    images, _ = load_digits()
    buf = io.BytesIO()
    Image.fromarray((images[k] * 15).astype("uint8")).resize((32, 32)).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def write_hf_parquet(path: Path, n: int, start: int = 0) -> list[tuple[bytes | None, int]]:
    """n rows (one with no image bytes), 4 rows per row group, ClassLabel metadata as `datasets` writes it."""
    rows = [(None if k == start + 5 else _png(k), k % 3) for k in range(start, start + n)]
    image = pa.array([{"bytes": b, "path": f"img_{k}.png"} for k, (b, _) in enumerate(rows)],
                     pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    features = {"image": {"_type": "Image"}, "label": {"names": NAMES, "_type": "ClassLabel"}}
    table = pa.table({"image": image, "label": pa.array([lab for _, lab in rows], pa.int64())})
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(table, path, row_group_size=4)
    return rows


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("pq") / "data"
    folder.mkdir()
    rows = write_hf_parquet(folder / "train-00000-of-00002.parquet", 11)
    rows += write_hf_parquet(folder / "train-00001-of-00002.parquet", 10, start=11)
    return folder, rows


def test_parquet_folder_with_class_label_names(hf, tmp_path):
    folder, rows = hf
    m = write_shards(folder, tmp_path / "out", samples_per_shard=6)
    assert m["classes"] == NAMES
    good = [(b, lab) for b, lab in rows if b is not None]
    assert m["label_counts"]["train"] == [sum(lab == c for _, lab in good) for c in range(3)]
    got = read_shards(tmp_path / "out")
    assert sorted((r["src_sha256"], r["cls"], r["label"]) for r in got) == sorted(
        (hashlib.sha256(b).hexdigest(), lab, NAMES[lab]) for b, lab in good)
    assert {r["src"] for r in got} >= {"train-00000-of-00002.parquet#0:0", "train-00001-of-00002.parquet#2:1"}
    assert m["rejects"]["by_reason"] == {"empty": 2}  # row 5 of each file
    assert "train-00000-of-00002.parquet#1:1" in (tmp_path / "out" / "rejects.jsonl").read_text()  # row 5


def test_parquet_same_bytes_for_any_worker_count(hf, tmp_path):
    folder, _ = hf
    pattern = str(folder / "train-*.parquet")  # a glob names the same files
    write_shards(pattern, tmp_path / "a", samples_per_shard=5, val_fraction=0.2, workers=1)
    write_shards(folder, tmp_path / "b", samples_per_shard=5, val_fraction=0.2, workers=2)
    shards = lambda d: {k: v for k, v in output_files(d).items() if k.endswith(".tar")}  # noqa: E731
    assert shards(tmp_path / "a") == shards(tmp_path / "b") and len(shards(tmp_path / "a")) == 5


def test_parquet_raw_bytes_and_string_labels_in_named_columns(tmp_path):
    table = pa.table({"jpg": pa.array([_png(k) for k in range(6)], pa.binary()),
                      "species": pa.array(["owl", "bat", "owl", "bat", "cat", None])})
    pq.write_table(table, tmp_path / "x.parquet")
    m = write_shards(tmp_path / "x.parquet", tmp_path / "out", image_column="jpg", label_column="species")
    assert m["classes"] == ["bat", "cat", "owl"] and m["label_counts"]["train"] == [2, 1, 2]
    assert m["rejects"]["by_reason"] == {"unlabeled": 1}


def test_parquet_without_the_named_column_is_one_clear_error(hf, tmp_path, capsys):
    folder, _ = hf
    out = tmp_path / "out"
    assert main(["write", str(folder), str(out), "--image-column", "img", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no column 'img'" in err and "--image-column" in err and "image, label" in err
    assert not (out / "dataset.json").exists() and not list(out.glob("*.tar*"))
