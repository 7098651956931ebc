"""Archive sources, on real images made in the test (scikit-learn's digits and sample photos): ImageNet's
tar-of-tars (.tar and .tar.gz), a flat tar + labels file, and re-sharding existing shards. Every good image
once with its synset as label, every bad member named in rejects, the same bytes for any --workers and after
a kill -9 + rerun, and nothing ever extracted to disk."""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from data_prep import write_shards
from data_prep.__main__ import main
from data_prep.examples import load_digits, photo_crops
from data_prep.verify import iter_samples
from tests.data_prep_fixtures import data_prep_cli, kill_after_shards, output_files

SYNSETS = ["n00000005", "n00000001", "n00000003", "n00000004", "n00000002"]  # archive order is not sorted
EMPTY_SYNSET = "n00000004"


def _png(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).convert("RGB").resize((32, 32)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img, quality=90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_tar_of_tars(path: Path, per_class: int = 6, photos: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """ImageNet's layout with every awkward member: returns ({virtual path: synset} of good images,
    {virtual path: reject reason}). `photos` adds that many JPEG photo crops per class (slower to encode)."""
    images, targets = load_digits()
    good, bad, inner = {}, {}, {}
    crops = photo_crops(photos * len(SYNSETS), size=(120, 90), seed=4)
    for c, syn in enumerate(SYNSETS):
        members = {}
        if syn != EMPTY_SYNSET:
            for k in range(per_class):
                members[f"{syn}_{k}.png"] = _png((images[c * 50 + k] * 15).astype("uint8"))
            for k in range(photos):
                members[f"{syn}_p{k}.JPEG"] = _jpeg(next(crops)[1])
        if syn == "n00000003":
            whole = _jpeg(next(photo_crops(1, size=(64, 48), seed=9))[1])
            members[f"{syn}_truncated.JPEG"] = whole[: len(whole) // 2]
            members["README.txt"] = b"not an image\n"
            bad[f"{syn}.tar/{syn}_truncated.JPEG"] = "truncated"
            bad[f"{syn}.tar/README.txt"] = "not_an_image"
        for name in members:
            if f"{syn}.tar/{name}" not in bad:
                good[f"{syn}.tar/{name}"] = syn
        inner[f"{syn}.tar"] = _tar_bytes(members)
    path.write_bytes(_tar_bytes(inner))
    return good, bad


def read_shards(out: Path) -> list[dict]:
    """Every sample of every split: its json plus the cls and the split."""
    manifest = json.loads((out / "dataset.json").read_text())
    rows = []
    for split, info in manifest["splits"].items():
        for s in info["shards"]:
            for _, sample in iter_samples(out / s["name"]):
                meta = json.loads(sample["json"])
                rows.append({**meta, "cls": int(sample["cls"]), "split": split})
    return rows


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("arch")
    good, bad = make_tar_of_tars(tmp / "whole.tar")
    (tmp / "whole.tar.gz").write_bytes(gzip.compress((tmp / "whole.tar").read_bytes(), mtime=0))
    return tmp / "whole.tar", tmp / "whole.tar.gz", good, bad


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_tar_of_tars_every_image_once_labelled_by_synset(archive, kind, tmp_path):
    plain, gz, good, bad = archive
    src = plain if kind == "tar" else gz
    m = write_shards(src, tmp_path / "out", samples_per_shard=7, val_fraction=0.2, seed=1)
    classes = sorted(s for s in SYNSETS if s != EMPTY_SYNSET)  # the empty inner tar gets no class
    assert m["classes"] == classes
    rows = read_shards(tmp_path / "out")
    assert Counter(r["src"] for r in rows) == Counter(list(good))  # every good image exactly once
    assert all(m["classes"][r["cls"]] == r["label"] == good[r["src"]] for r in rows)
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["path"]: r["reason"] for r in rejects} == bad
    assert m["options"]["source_format"] == "auto"


def test_tar_and_tar_gz_give_the_same_shards(archive, tmp_path):
    plain, gz, _, _ = archive
    write_shards(plain, tmp_path / "a", samples_per_shard=5)
    write_shards(gz, tmp_path / "b", samples_per_shard=5)
    shards = lambda d: {k: v for k, v in output_files(d).items() if k.endswith(".tar")}  # noqa: E731
    assert shards(tmp_path / "a") == shards(tmp_path / "b") and len(shards(tmp_path / "a")) == 6
    assert not list((tmp_path / "b" / ".parts").glob("spool*"))  # the .tar.gz's spool is gone once written
    (tmp_path / "b" / "train-000002.tar").unlink()  # lost: the rerun finds the listing cached, the spool gone
    write_shards(gz, tmp_path / "b", samples_per_shard=5)
    assert shards(tmp_path / "b") == shards(tmp_path / "a") and not list((tmp_path / "b" / ".parts").glob("spool*"))


def test_tar_of_tars_same_bytes_for_any_worker_count(archive, tmp_path):
    plain, _, _, _ = archive
    one = write_shards(plain, tmp_path / "a" / "out", workers=1, samples_per_shard=4, val_fraction=0.2)
    two = write_shards(plain, tmp_path / "b" / "out", workers=2, samples_per_shard=4, val_fraction=0.2)
    assert one == two
    assert output_files(tmp_path / "a" / "out") == output_files(tmp_path / "b" / "out")


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_tar_of_tars_kill_9_then_rerun_is_byte_identical_and_nothing_is_extracted(tmp_path, kind):
    make_tar_of_tars(tmp_path / "whole.tar", per_class=2, photos=24)
    src = tmp_path / f"whole.{kind}"
    if kind == "tar.gz":  # written in one pass through a spool of the members, removed at the end
        src.write_bytes(gzip.compress((tmp_path / "whole.tar").read_bytes(), mtime=0))
    args = ["--format", "webp", "--quality", "90", "--samples-per-shard", "4", "--seed", "5"]
    write_shards(src, tmp_path / "ref" / "out", format="webp", quality=90, samples_per_shard=4, seed=5)
    out, tmpdir = tmp_path / "run" / "out", tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = data_prep_cli(["write", str(src), str(out), "--workers", "2", *args], env={"TMPDIR": str(tmpdir)})
    kill_after_shards(proc, out, random.randint(0, 6))  # once 0-6 shards are finished
    assert not (out / "dataset.json").exists()
    assert main(["write", str(src), str(out), "--workers", "2", "--no-progress", *args]) == 0
    assert output_files(out) == output_files(tmp_path / "ref" / "out")
    assert not list(out.glob("*.tmp"))
    # never extracted: no image file anywhere (only shards and bookkeeping), the temp dir untouched
    assert not list(tmpdir.iterdir())
    kept = {p.suffix for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert kept <= {".tar", ".json", ".jsonl", ".npz"}
    assert [p.relative_to(out) for p in out.rglob(".lock")] == [Path(".parts/.lock")]  # the write's lock file


def test_inner_member_that_is_not_a_tar_is_a_counted_reject(tmp_path):
    good = _tar_bytes({"n1_0.png": _png((load_digits()[0][0] * 15).astype("uint8"))})
    (tmp_path / "bad.tar").write_bytes(_tar_bytes({"n1.tar": good, "n2.tar": b"this is no tar" * 100,
                                                   "notes.txt": b"hello"}))
    assert main(["write", str(tmp_path / "bad.tar"), str(tmp_path / "out"), "--no-progress"]) == 0
    m = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert m["classes"] == ["n1"] and m["splits"]["train"]["samples"] == 1
    rejects = {json.loads(x)["path"]: json.loads(x)["reason"] for x in
               (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()}
    assert rejects == {"n2.tar": "not_a_tar", "notes.txt": "not_a_tar"}


def test_flat_tar_with_a_labels_file(tmp_path):
    images, _ = load_digits()
    members = {f"val_{k:04d}.png": _png((images[k] * 15).astype("uint8")) for k in range(12)}
    (tmp_path / "val.tar").write_bytes(_tar_bytes(members))
    rows = [f"./val_{k:04d}.png,n{k % 3}" for k in range(11)] + ["val_9999.png,n0"]  # one missing, one unlisted
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    m = write_shards(tmp_path / "val.tar", tmp_path / "out", labels=tmp_path / "labels.csv")
    assert m["classes"] == ["n0", "n1", "n2"] and m["label_counts"]["train"] == [4, 4, 3]
    got = {r["src"]: r["label"] for r in read_shards(tmp_path / "out")}
    assert got == {f"val_{k:04d}.png": f"n{k % 3}" for k in range(11)}
    assert m["rejects"]["by_reason"] == {"missing_member": 1, "unlabeled": 1}
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text()
    assert "val_9999.png" in rejects and "val_0011.png" in rejects


def test_flat_tar_without_labels_or_folders_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "val.tar").write_bytes(_tar_bytes({"a.png": _png(load_digits()[0][0].astype("uint8"))}))
    assert main(["write", str(tmp_path / "val.tar"), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--labels" in err
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "dataset.json").exists()


def test_reshard_existing_shards(archive, tmp_path):
    plain, _, _, _ = archive
    first = write_shards(plain, tmp_path / "a", samples_per_shard=3, val_fraction=0.2, seed=2)
    again = write_shards(tmp_path / "a" / "dataset.json", tmp_path / "b", samples_per_shard=10)
    assert again["classes"] == first["classes"]
    samples = lambda m: {s: v["samples"] for s, v in m["splits"].items()}  # noqa: E731
    assert samples(again) == samples(first)
    assert all(s["samples"] <= 10 for v in again["splits"].values() for s in v["shards"])
    key = lambda r: (r["sha256"], r["label"], r["split"])  # noqa: E731
    assert sorted(map(key, read_shards(tmp_path / "b"))) == sorted(map(key, read_shards(tmp_path / "a")))
    # a brace pattern over the train shards only, labels from the json's label field
    n = len(first["splits"]["train"]["shards"])
    pattern = str(tmp_path / "a" / f"train-{{000000..{n - 1:06d}}}.tar")
    m = write_shards(pattern, tmp_path / "c", samples_per_shard=100, label_column="json:label")
    assert m["splits"]["train"]["samples"] == first["splits"]["train"]["samples"] and list(m["splits"]) == ["train"]


def test_min_per_class_and_class_names(archive, tmp_path, capsys):
    plain, _, good, _ = archive
    (tmp_path / "words.txt").write_text("".join(f"{s}\tthing number {s[-1]}\n" for s in SYNSETS))
    assert main(["write", str(plain), str(tmp_path / "out"), "--min-per-class", "7", "--class-names",
                 str(tmp_path / "words.txt"), "--no-progress"]) == 0
    assert "dropped classes: 3 with fewer than 7 images (18 images" in capsys.readouterr().out
    m = json.loads((tmp_path / "out" / "dataset.json").read_text())
    # counted when planning: n00000003's 8 members (6 good, a truncated one and a text file, found only when
    # decoded) reach 7, the other classes' 6 do not
    assert m["classes"] == ["n00000003"]
    assert m["dropped_classes"] == {"min_per_class": 7, "count": 3, "images": 18,
                                    "classes": {"n00000001": 6, "n00000002": 6, "n00000005": 6}}
    assert m["splits"]["train"]["samples"] == Counter(good.values())["n00000003"]
    assert m["class_names"] == [f"thing number {c[-1]}" for c in m["classes"]]
    rows = read_shards(tmp_path / "out")
    assert rows and all(m["classes"][r["cls"]] == r["label"] for r in rows)  # numbered again from 0


def test_tar_of_tars_on_two_nodes_then_merge_equals_one_node(archive, tmp_path):
    from data_prep import merge

    plain, _, _, _ = archive
    one, two = tmp_path / "one" / "out", tmp_path / "two" / "out"
    write_shards(plain, one, samples_per_shard=4, val_fraction=0.2)
    for rank in (1, 0):  # node 1 lists its inner tars, node 0 its own and takes node 1's from the cache
        write_shards(plain, two, samples_per_shard=4, val_fraction=0.2, num_nodes=2, node_rank=rank)
    assert len(list((two / ".parts" / "list").glob("unit-*.npz"))) == 5
    merge(two)
    assert output_files(two) == output_files(one)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tarscan_reads_what_tarfile_reads(tmp_path, fmt):
    from data_prep.tarscan import scan_members

    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # past 100 chars: prefix, L or pax
    names = ["a.jpg", f"{long_dir}/b.png", "ünï/çödé.jpg" if fmt == tarfile.PAX_FORMAT else "c.jpg", "empty.jpg"]
    with tarfile.open(tmp_path / "x.tar", "w", format=fmt) as tar:
        for k, name in enumerate(names):
            data = bytes([k]) * (k * 700)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    size = (tmp_path / "x.tar").stat().st_size
    with open(tmp_path / "x.tar", "rb") as f, tarfile.open(tmp_path / "x.tar") as tar:
        want = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        assert list(scan_members(f, 0, size)) == want and [w[0] for w in want] == names
    (tmp_path / "bad.tar").write_bytes(b"garbage " * 200)
    with open(tmp_path / "bad.tar", "rb") as f, pytest.raises(tarfile.ReadError):
        list(scan_members(f, 0, 1600))


def test_units_are_split_among_nodes_by_size():
    from data_prep.units import node_of_units

    sizes = [100, 10, 10, 10, 10, 10, 60, 30]
    nodes = node_of_units(sizes, 2)
    load = [sum(s for s, n in zip(sizes, nodes, strict=True) if n == k) for k in (0, 1)]
    assert load == [120, 120] and nodes == node_of_units(sizes, 2)
    assert node_of_units(sizes, 1) == [0] * 8
