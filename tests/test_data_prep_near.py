"""--exclude-near: copies of downstream images (re-encoded at JPEG q60, resized 0.8x, cropped 5 %, grayscale-RGB)
mixed into a training source are dropped as `near_duplicate` rejects naming the image they match, while 1,000
unrelated images (scikit-learn's digits) are all kept; the multi-index lookup equals a full scan."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import write_example_images, write_shards
from data_prep.examples import photo_crops
from data_prep.near import NEAR_THRESHOLD, NearIndex, hamming, phash_bytes


def _variants(img: Image.Image) -> dict[str, tuple[Image.Image, dict]]:
    """The near copies a downstream image usually has in a web-crawled training set."""
    w, h = img.size
    cw, ch = round(w * 0.025), round(h * 0.025)  # 5 % of each side in all: 2.5 % a side
    return {"q60.jpg": (img, {"quality": 60}),
            "resized.png": (img.resize((round(w * 0.8), round(h * 0.8)), Image.Resampling.BICUBIC), {}),
            "cropped.png": (img.crop((cw, ch, w - cw, h - ch)), {}),
            "grey.jpg": (img.convert("L").convert("RGB"), {"quality": 90})}


@pytest.fixture(scope="module")
def near_sets(tmp_path_factory) -> tuple[Path, Path, Path, dict[str, str]]:
    """(downstream folder, downstream shards, training folder, {training copy: downstream image it copies})."""
    tmp = tmp_path_factory.mktemp("near")
    down, other = tmp / "down" / "any", tmp / "other" / "any"
    down.mkdir(parents=True)
    other.mkdir(parents=True)
    train = write_example_images(tmp / "train", "digits", per_class=100)  # 1,000 unrelated images
    (train / "copies").mkdir()
    copies = {}
    sizes = [(160, 120), (96, 128), (240, 180), (120, 120)]
    for k, (_, crop) in enumerate(photo_crops(8, seed=11)):
        img = crop.resize(sizes[k % 4], Image.Resampling.BICUBIC)
        target, name = (down, f"{tmp / 'down'}:any/{k}.jpg") if k < 5 else (other, f"{tmp / 'other_shards'}")
        img.save(target / f"{k}.jpg", quality=92)
        for suffix, (v, kw) in _variants(img).items():
            v.save(train / "copies" / f"{k}_{suffix}", **kw)
            copies[f"copies/{k}_{suffix}"] = name
    write_shards(tmp / "other", tmp / "other_shards")  # a downstream set given as shards
    return tmp / "down", tmp / "other_shards", train, copies


def test_near_copies_dropped_and_unrelated_images_kept(near_sets, tmp_path):
    down, other_shards, train, copies = near_sets
    out = tmp_path / "out"
    m = write_shards(train, out, samples_per_shard=500, workers=2,
                     exclude_near=f"{down},{other_shards / 'dataset.json'}")
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    near = {r["path"]: r["detail"] for r in rejects if r["reason"] == "near_duplicate"}
    assert set(near) == set(copies)  # every copy, and not one of the 1,000 digits
    for path, detail in near.items():  # "N bits from SET:IMAGE": the downstream image it copies
        assert f"from {copies[path]}" in detail and int(detail.split()[0]) <= NEAR_THRESHOLD
    assert m["rejects"]["by_reason"] == {"near_duplicate": 32}
    assert m["splits"]["train"]["samples"] == 1000 and m["label_counts"]["train"][:10] == [100] * 10
    assert m["options"]["near_threshold"] == NEAR_THRESHOLD and m["options"]["near_hashes_sha256"]
    assert Counter(Path(p).name.split("_", 1)[1] for p in near) == {"q60.jpg": 8, "resized.png": 8,
                                                                     "cropped.png": 8, "grey.jpg": 8}


def test_near_filter_with_resizing_on_the_way_and_threshold_zero(near_sets, tmp_path):
    down, _, train, copies = near_sets
    with tarfile.open(tmp_path / "down.tar.gz", "w:gz") as tar:  # the downstream set as a gzip'd tar of folders
        tar.add(down / "any", arcname="any")
    m = write_shards(train, tmp_path / "a", samples_per_shard=2000, exclude_near=str(tmp_path / "down.tar.gz"),
                     resize_shorter=24)
    assert m["rejects"]["by_reason"]["near_duplicate"] == sum(":any/" in v for v in copies.values())
    m = write_shards(train, tmp_path / "b", samples_per_shard=2000, exclude_near=str(down), near_threshold=0)
    assert m["rejects"]["by_reason"].get("near_duplicate", 0) < 20  # exact-hash matches only: most copies pass


def test_phash_is_stable_under_the_copies_and_apart_for_distinct_images():
    crops = [c.resize((160, 120)) for _, c in photo_crops(4, seed=2)]
    for img in crops:
        base = phash_bytes(_encode(img, "JPEG", quality=95))
        for v, kw in _variants(img).values():
            assert hamming(base, phash_bytes(_encode(v, "JPEG" if "quality" in kw else "PNG", **kw))) <= 10


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("threshold", [0, 3, 8, 10, 13])
def test_multi_index_lookup_equals_a_full_scan(threshold):
    rng = np.random.default_rng(threshold)
    base = rng.integers(0, 2**63, 2000, dtype=np.uint64)
    index = NearIndex.build(base, threshold)
    flips = lambda h, n: h ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, n, replace=False)))  # noqa: E731
    queries = [flips(base[k], int(rng.integers(0, threshold + 3))) for k in range(300)]
    queries += list(rng.integers(0, 2**63, 200, dtype=np.uint64))
    for q in queries:
        d = hamming(base, q)
        want = (int(np.argmin(d)), int(d.min())) if d.min() <= threshold else None
        assert index.lookup(int(q)) == want
    with pytest.raises(ValueError, match="--near-threshold"):
        NearIndex.build(base, 40)


def test_bad_near_options_fail_before_any_work(near_sets, tmp_path, capsys):
    from data_prep.__main__ import main

    _, _, train, _ = near_sets
    out = tmp_path / "out"
    assert main(["write", str(train), str(out), "--exclude-near", str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["write", str(train), str(out), "--exclude-near", str(train), "--near-threshold", "40",
                 "--no-progress"]) == 2
    assert "--near-threshold must be in 0..31" in capsys.readouterr().err
    assert not list(out.glob("*.tar")) and not (out / ".parts" / "plan.json").exists()
