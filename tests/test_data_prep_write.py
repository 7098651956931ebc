"""End to end on real images (scikit-learn digits and photos) plus every odd kind: each good image lands in
exactly one shard of one split with the right label, each bad one in rejects.jsonl with its reason, and
webdataset, timm and `verify` all read the result."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

from data_prep import verify, write_example_images, write_shards
from data_prep.__main__ import main
from data_prep.examples import write_odd_images


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, dict[str, str | None], str]:
    """digits (20 a class) + photos (6 a class) + odd kinds; returns (root, expected reasons, excluded path)."""
    tmp = tmp_path_factory.mktemp("src")
    root = write_example_images(tmp / "src", "digits", per_class=20)
    photos = write_example_images(tmp / "photos", "photos", per_class=6)
    for d in photos.iterdir():
        shutil.move(d, root / d.name)
    expect = write_odd_images(root)
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() not in expect:
            expect[p.relative_to(root).as_posix()] = None
    excluded = "3/0013.png"
    expect[excluded] = "excluded"
    return root, expect, excluded


@pytest.fixture(scope="module")
def written(source, tmp_path_factory) -> tuple[Path, dict]:
    root, _, excluded = source
    out = tmp_path_factory.mktemp("out") / "shards"
    hashes = out.parent / "eval_hashes.txt"
    hashes.write_text(f"# images of another dataset\n{hashlib.sha256((root / excluded).read_bytes()).hexdigest()}\n")
    manifest = write_shards(root, out, val_fraction=0.2, samples_per_shard=64, exclude_hashes=hashes, seed=7)
    return out, manifest


def _read_all(out: Path, manifest: dict) -> dict[str, list]:
    """split -> [(image, cls, meta, raw image bytes)] through plain webdataset."""
    result = {}
    for split, info in manifest["splits"].items():
        urls = [str(out / s["name"]) for s in info["shards"]]
        raw = wds.WebDataset(urls, shardshuffle=False).to_tuple("jpg;png;webp", "cls", "json")
        result[split] = [(Image.open(io.BytesIO(b)), int(c), json.loads(m), b) for b, c, m in raw]
    return result


def test_every_good_image_once_every_bad_one_rejected(source, written):
    root, expect, _ = source
    out, manifest = written
    samples = _read_all(out, manifest)
    seen = Counter(meta["src"] for rows in samples.values() for _, _, meta, _ in rows)
    good = {p for p, reason in expect.items() if reason is None}
    assert set(seen) == good and set(seen.values()) == {1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejects} == {p: r for p, r in expect.items() if r is not None}
    assert manifest["rejects"]["count"] == len(rejects)
    assert manifest["rejects"]["by_reason"] == dict(Counter(r["reason"] for r in rejects))
    classes = manifest["classes"]
    assert classes == [str(d) for d in range(10)] + ["china", "flower", "odd"]
    for split, rows in samples.items():
        assert len(rows) == manifest["splits"][split]["samples"]
        counts = [0] * len(classes)
        for img, cls, meta, data in rows:
            assert classes[cls] == meta["label"] == meta["src"].split("/")[0]
            assert img.convert("RGB").size == (meta["width"], meta["height"])
            assert hashlib.sha256(data).hexdigest() == meta["sha256"]
            counts[cls] += 1
        assert counts == manifest["label_counts"][split]


def test_splits_hold_out_a_fraction_of_every_class(written):
    out, manifest = written
    val = manifest["label_counts"]["val"]
    train = manifest["label_counts"]["train"]
    assert val[:10] == [4] * 10  # round(0.2 * 20) digits of each class (one excluded "3" leaves 19: still 4)
    assert val[10:12] == [1, 1]  # photos: 6 a class -> 1
    assert [t + v for t, v in zip(train, val, strict=True)][:10] == [20, 20, 20, 19, 20, 20, 20, 20, 20, 20]


def test_shards_mix_classes_and_keep_jpeg_bytes(source, written):
    root, _, _ = source
    out, manifest = written
    samples = _read_all(out, manifest)
    first = [cls for _, cls, _, _ in samples["train"][:64]]
    assert len(set(first)) >= 8  # the global shuffle: one shard holds most classes
    photos = [(meta, data) for _, _, meta, data in samples["train"] if meta["label"] in ("china", "flower")]
    assert photos and all(data == (root / meta["src"]).read_bytes() for meta, data in photos)  # passed through


def test_timm_reads_the_shards(written):
    from timm.data import create_dataset

    out, manifest = written
    ds = create_dataset("wds/example", root=str(out), split="val")
    targets = Counter(t for _, t in ds)
    assert sum(targets.values()) == manifest["splits"]["val"]["samples"]
    assert [targets.get(c, 0) for c in range(len(manifest["classes"]))] == manifest["label_counts"]["val"]


def test_verify_finds_damage(written, tmp_path):
    out, manifest = written
    assert verify(out) == [] and verify(out, decode=True, workers=2) == []
    bad = tmp_path / "shards"
    shutil.copytree(out, bad)
    first, second = (s["name"] for s in manifest["splits"]["train"]["shards"][:2])
    with tarfile.open(bad / first) as tar:
        image = next(m for m in tar if m.name.endswith((".jpg", ".png", ".webp")))
    data = bytearray((bad / first).read_bytes())
    data[image.offset_data + image.size // 2] ^= 0xFF  # inside the first image's bytes
    (bad / first).write_bytes(bytes(data))
    (bad / second).unlink()
    (bad / "train-999999.tar").write_bytes(b"")
    problems = verify(bad)
    assert any(first in p and "sha256 differs" in p for p in problems)
    assert any(first in p and "do not match the json sha256" in p for p in problems)
    assert f"{second}: missing" in problems
    assert any("train-999999.tar" in p and "not listed" in p for p in problems)
    assert main(["verify", str(bad)]) == 1 and main(["verify", str(out)]) == 0


def test_full_digits_with_val_fraction(tmp_path):
    src = write_example_images(tmp_path / "digits", "digits")
    m = write_shards(src, tmp_path / "out", val_fraction=0.1, workers=2)
    assert m["splits"]["train"]["samples"] + m["splits"]["val"]["samples"] == 1797
    assert m["rejects"]["count"] == 0
    counts = np.array(m["label_counts"]["train"]) + np.array(m["label_counts"]["val"])
    assert counts.tolist() == np.bincount(load_digits().target).tolist()
    assert all(abs(v - 0.1 * n) <= 1 for v, n in zip(m["label_counts"]["val"], counts.tolist(), strict=True))


def test_list_source_with_split_column_resize_and_webp(source, tmp_path):
    root, expect, _ = source
    good = sorted(p for p, r in expect.items() if r is None and p.split("/")[0] in ("china", "flower", "odd"))
    rows = [{"path": str(root / p), "label": p.split("/")[0], "split": "test" if i % 3 == 0 else "train"}
            for i, p in enumerate(good)]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = write_shards(tmp_path / "list.jsonl", tmp_path / "out", resize_shorter=32, format="webp", quality=80)
    assert list(m["splits"]) == ["train", "test"]
    assert m["splits"]["test"]["samples"] == len(good[::3])
    for info in m["splits"].values():
        urls = [str(tmp_path / "out" / s["name"]) for s in info["shards"]]
        for img, meta in wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("webp", "json"):
            src = Image.open(meta["src"])
            assert img.size == (meta["width"], meta["height"])
            assert min(img.size) == min(32, *src.size)  # shrunk to 32, never enlarged


def test_cli_write_stats_preview_and_nothing_usable(source, written, tmp_path, capsys):
    out, manifest = written
    assert main(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "flower" in text and f"rejects: {manifest['rejects']['count']} (" in text and "shorter side" in text
    assert main(["preview", str(out), "--out", str(tmp_path / "grid.png"), "--n", "16"]) == 0
    assert Image.open(tmp_path / "grid.png").size == (4 * 96, 4 * (96 + 14))
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.txt").write_text("text")
    assert main(["write", str(bad.parent), str(tmp_path / "o"), "--no-progress"]) == 1
    assert "no usable image" in capsys.readouterr().err
    assert [json.loads(x)["reason"] for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()] == [
        "empty", "not_an_image"]
    # the manifest of nothing is refused by preview (exit 2, one line), not drawn as an empty grid
    assert main(["preview", str(tmp_path / "o"), "--out", str(tmp_path / "empty.png")]) == 2
    assert "has no samples to preview" in capsys.readouterr().err and not (tmp_path / "empty.png").exists()


def test_rerun_with_other_options_is_refused(source, written):
    out, _ = written
    with pytest.raises(ValueError, match="other inputs or options"):
        write_shards(source[0], out, val_fraction=0.3, samples_per_shard=64)


def test_exclude_hashes_from_another_datasets_manifest(source, tmp_path):
    """Images already in an eval set (read from its dataset.json and shards) are kept out of training,
    even when the eval set stored them re-encoded."""
    root, expect, _ = source
    photos = sorted(p for p in expect if p.split("/")[0] in ("china", "flower"))
    rows = "".join(json.dumps({"path": str(root / p), "label": p.split("/")[0]}) + "\n" for p in photos[:5])
    (tmp_path / "eval.jsonl").write_text(rows)
    write_shards(tmp_path / "eval.jsonl", tmp_path / "eval", resize_shorter=64)  # stored bytes != source bytes
    m = write_shards(root, tmp_path / "train", exclude_hashes=tmp_path / "eval" / "dataset.json",
                     samples_per_shard=500)
    rejects = [json.loads(x) for x in (tmp_path / "train" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["path"] for r in rejects if r["reason"] == "excluded") == photos[:5]
    assert m["rejects"]["by_reason"]["excluded"] == 5


def test_bad_write_options_are_each_named_with_their_value(source, tmp_path, capsys):
    args = ["write", str(source[0]), str(tmp_path / "out"), "--no-progress"]
    assert main([*args, "--val-fraction", "1.5", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: --val-fraction must be in [0, 1), got 1.5; --workers must be >= 1, got 0"]
    assert not (tmp_path / "out").exists()
    # numpy's "expected non-negative integer" once, naming no option; a threshold no 64-bit hash distance reaches
    assert main([*args, "--seed", "-1", "--near-threshold", "65"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --seed must be >= 0, got -1; --near-threshold must be in 0..64 (bits of a 64-bit pHash), got 65"]
    assert not (tmp_path / "out").exists()
