"""List tar archives without extracting them: ImageNet's tar-of-tars, a flat tar (+ a labels file), and
existing WebDataset shards.

- tar-of-tars (`fall11_whole.tar`, `winter21_whole.tar.gz`, `ILSVRC2012_img_train.tar`): one inner tar per
  class (`n01440764.tar`), whose stem is the label. An uncompressed archive is listed by inner tar in
  parallel (each worker reads its inner tars' headers and hashes their members at their offsets). A `.tar.gz`
  has no random access: it is streamed once, in one process, and while its members are hashed their bytes
  are copied into one spool file (`OUT/.parts/spool-<node>.bin`), which the writer then reads as an
  uncompressed archive (one decompression in all; the spool is deleted once the shards are written).
- flat tar (`ILSVRC2012_img_val.tar`): labels from `--labels FILE` (CSV/JSONL `path,label[,split]`, the path
  being the member name), or else the member's first folder (an ImageFolder tree inside a tar).
- WebDataset shards (a brace pattern, a folder of `.tar`, or a `dataset.json`): one sample per key, its
  image member and its label from `.cls` (or `--label-column`: another member, or `json:FIELD`).

Each entry is located by (archive, offset of its data, size): the writer reads exactly those bytes.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from data_prep.sources import Listing, SourceError, list_file, sort_classes, sort_splits
from data_prep.tarscan import scan_members
from data_prep.units import add_row, new_rows, pack, run_units, unit_fingerprint

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


class Window:
    """A read-only file view of bytes [start, start + size) of an open file: an inner tar, read in place."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        self.f.seek(self.start + self.pos)
        b = self.f.read(n)
        self.pos += len(b)
        return b

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos


def _list_tar(tar: tarfile.TarFile, base: int, rows: dict, prefix: str = "", label: str = "", spool=None) -> None:
    """Append a row per file member of `tar` (hashed; offsets absolute = `base` + offset in `tar`, or in `spool`
    when the bytes are copied there)."""
    for m in tar:
        if m.isfile():
            add_row(rows, prefix + m.name, base + m.offset_data, m.size, tar.extractfile(m), label, spool)


@contextlib.contextmanager
def _spool_file(spool: str) -> Iterator:
    """The spool opened for writing (None when there is none), flushed to disk at the end."""
    if not spool:
        yield None
        return
    Path(spool).parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(spool, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(spool).unlink(missing_ok=True)  # half a spool is of no use (and may be half a dataset in size)
        raise


def _not_a_tar(name: str, e: Exception) -> dict:
    return {"path": name, "reason": "not_a_tar", "detail": f"an inner member that is not a readable tar ({e})"}


def list_inner_tar(args: tuple[str, str, int, int]) -> dict:
    """Worker: list and hash one inner tar of an uncompressed tar-of-tars, read in place."""
    path, name, start, size = args
    rows, rejects, stem = new_rows(), [], Path(name).name.removesuffix(".tar")
    with open(path, "rb") as f:
        try:  # tarscan, not tarfile: the header parsing is most of a listing's cost
            for member, offset, n in scan_members(f, start, size):
                add_row(rows, f"{name}/{member}", offset, n, Window(f, offset, n), stem)
        except TAR_ERRORS as e:  # the members before the damage are kept
            rejects.append(_not_a_tar(name, e))
    return pack(rows, rejects)


def stream_tar_of_tars(args: tuple[str, str]) -> dict:
    """A gzip'd tar-of-tars in one streamed pass: every inner tar's members listed, hashed and, with a spool
    path, copied there (offsets are then the spool's)."""
    path, spool = args
    rows, rejects = new_rows(), []
    try:
        with _spool_file(spool) as sp, tarfile.open(path, mode="r|gz") as outer:
            for m in outer:
                if not m.isfile():
                    continue
                if not m.name.endswith(".tar"):
                    rejects.append({"path": m.name, "reason": "not_a_tar", "detail": "not a .tar member"})
                    continue
                try:
                    with tarfile.open(fileobj=outer.extractfile(m), mode="r|") as tar:
                        _list_tar(tar, m.offset_data, rows, f"{m.name}/", Path(m.name).name.removesuffix(".tar"), sp)
                except TAR_ERRORS as e:
                    rejects.append(_not_a_tar(m.name, e))
    except TAR_ERRORS as e:
        raise SourceError(f"{path}: damaged archive ({e}): download it again (or check it with `gzip -t`)") from None
    return pack(rows, rejects)


def _outer_members(path: str) -> tuple[list[tarfile.TarInfo], list[dict]]:
    """The inner tars of an uncompressed tar-of-tars, from its headers alone (data is seeked over)."""
    inner, rejects = [], []
    try:
        with tarfile.open(path, mode="r:") as outer:
            for m in outer:
                if m.isfile() and m.name.endswith(".tar"):
                    inner.append(m)
                elif m.isfile():
                    rejects.append({"path": m.name, "reason": "not_a_tar", "detail": "not a .tar member"})
    except TAR_ERRORS as e:
        raise SourceError(f"{path}: not a readable tar ({e}): download it again") from None
    return inner, rejects


def spool_path(cache_dir: Path | None, nodes: tuple[int, int]) -> str:
    """Where a `.tar.gz`'s members are spooled: beside the listing cache, one file per node ("" without a cache:
    a downstream set, read straight from the stream)."""
    return str(cache_dir.parent / f"spool-{nodes[0]}.bin") if cache_dir else ""


def _units(path: str, cache_dir: Path | None, imap: Callable, nodes: tuple[int, int]) -> tuple[list[dict], list[dict]]:
    if is_gzip(path):  # one stream, one process; every node spools for itself, so no node split
        spool = spool_path(cache_dir, nodes)
        result = run_units(stream_tar_of_tars, [(path, spool)], [unit_fingerprint(path, "tar-of-tars", bool(spool))],
                           [os.path.getsize(path)], cache_dir)
        return result, []
    inner, rejects = _outer_members(path)
    tasks = [(path, m.name, m.offset_data, m.size) for m in inner]
    fps = [unit_fingerprint(path, *t[1:]) for t in tasks]
    return run_units(list_inner_tar, tasks, fps, [m.size for m in inner], cache_dir, imap, *nodes), rejects


def _assemble(path: str, results: list[dict], rejects: list[dict], labels: list[str] | None = None,
              classes: list[str] | None = None, kind: str | None = None, spool: str = "") -> Listing:
    """One listing from unit results: entries in (class, path) order; the class list sorted unless given."""
    cat = {k: np.concatenate([r[k] for r in results]) if results else np.zeros(0) for k in ("offset", "size")}
    names = [str(n) for r in results for n in r["name"]]
    sha = np.concatenate([r["sha"] for r in results]) if results else np.zeros((0, 32), np.uint8)
    status = np.concatenate([r["status"] for r in results]) if results else np.zeros(0, np.uint8)
    labels = labels if labels is not None else [str(x) for r in results for x in r["label"]]
    rejects = rejects + [x for r in results for x in json.loads(r["rejects"])]
    keep = [i for i, lab in enumerate(labels) if lab]
    classes = classes if classes is not None else sort_classes(labels[i] for i in keep)
    if not keep or not classes:
        raise SourceError(f"{path} holds no labelled image: nothing to write; expected images with a label (a "
                          "class folder, a --labels row, or a shard sample's .cls member)")
    cid = {c: k for k, c in enumerate(classes)}
    order = sorted(keep, key=lambda i: (cid[labels[i]], names[i]))
    from data_prep.plan import Index  # plan imports sources: import here, not at the top

    idx = np.array(order, np.int64)
    listing = Listing(root=Path(path).resolve().parent, paths=[names[i] for i in order],
                      labels=np.array([cid[labels[i]] for i in order], np.int32), classes=classes)
    listing.kind = kind or ("gztar" if is_gzip(path) and not spool else "tar")
    listing.files, listing.file_id = [spool or str(Path(path).resolve())], np.zeros(len(order), np.int32)
    listing.spool = spool
    listing.offset, listing.size = cat["offset"][idx].astype(np.int64), cat["size"][idx].astype(np.int64)
    listing.index = Index(sha[idx], listing.size.copy(), status[idx])
    listing.index.detail = {int(i): "zero bytes" for i in np.flatnonzero(listing.index.status)}
    listing.rejects = sorted(rejects, key=lambda r: (r["path"], r["reason"]))
    return listing


def list_tar_of_tars(path: str, imap: Callable = map, cache_dir: Path | None = None,
                     nodes: tuple[int, int] = (0, 1)) -> Listing:
    """ImageNet's layout: one inner tar per class, the label its stem; never extracted."""
    results, rejects = _units(path, cache_dir, imap, nodes)
    return _assemble(path, results, rejects, spool=spool_path(cache_dir, nodes) if is_gzip(path) else "")


def _labels_by_member(labels_file: str) -> tuple[dict[str, str], dict[str, str]]:
    listed = list_file(Path(labels_file).resolve())
    names = [p.removeprefix("./") for p in listed.paths]
    label = {n: listed.classes[k] for n, k in zip(names, listed.labels.tolist(), strict=True)}
    split = {} if listed.split_ids is None else {
        n: listed.split_names[s] for n, s in zip(names, listed.split_ids.tolist(), strict=True)}
    return label, split


def list_flat_tar(path: str, labels_file: str | None = None, cache_dir: Path | None = None,
                  nodes: tuple[int, int] = (0, 1)) -> Listing:
    """A tar of images; labels from `labels_file` (member name -> label[, split]) or each member's first folder."""
    gz = is_gzip(path)
    spool = spool_path(cache_dir, nodes) if gz else ""

    def one(args):
        rows = new_rows()
        try:
            with _spool_file(spool) as sp, tarfile.open(path, mode="r|gz" if gz else "r:") as tar:
                _list_tar(tar, 0, rows, spool=sp)
        except TAR_ERRORS as e:
            raise SourceError(f"{path}: not a readable tar ({e})") from None
        return pack(rows, [])

    (result,) = run_units(one, [(path,)], [unit_fingerprint(path, "flat", bool(spool))], [0], cache_dir)
    names = [str(n).removeprefix("./") for n in result["name"]]
    result["name"] = np.array(names, dtype=str) if names else result["name"]
    if not names:
        raise SourceError(f"{path} holds no image: nothing to write; expected image members (<class>/<image>, or "
                          "any names with --labels FILE)")
    rejects, splits = [], {}
    if labels_file:
        label, splits = _labels_by_member(labels_file)
        labels = [label.get(n, "") for n in names]
        rejects += [{"path": n, "reason": "unlabeled", "detail": f"not in --labels {labels_file}"}
                    for n, lab in zip(names, labels, strict=True) if not lab]
        present = set(names)
        rejects += [{"path": n, "reason": "missing_member", "detail": f"listed in {labels_file}, not in the archive"}
                    for n in sorted(set(label) - present)]
    else:
        labels = [n.split("/")[0] if "/" in n else "" for n in names]
        if not any(labels):
            raise SourceError(f"{path} has no class folders inside: pass --labels FILE (CSV/JSONL of member "
                              "name,label), as ImageNet-1k val needs")
        rejects += [{"path": n, "reason": "unlabeled", "detail": "not in a class folder"}
                    for n, lab in zip(names, labels, strict=True) if not lab]
    listing = _assemble(path, [result], rejects, labels, spool=spool)
    if splits:
        listing.split_names = tuple(sort_splits(set(splits.values())))
        sid = {s: i for i, s in enumerate(listing.split_names)}
        listing.split_ids = np.array([sid[splits[p]] for p in listing.paths], np.int16)
    return listing


def shard_files(spec: str) -> tuple[list[str], list[str] | None, dict[str, str]]:
    """(shard paths, class names if a dataset.json gives them, shard name -> its split there) of a brace
    pattern, a folder of `.tar`, or a `dataset.json` (or its folder)."""
    p = Path(spec)
    if p.is_dir() and (p / "dataset.json").exists():
        p = p / "dataset.json"
    if p.suffix == ".json":
        from data_prep.manifest import read_manifest

        m = read_manifest(p)
        split_of = {s["name"]: split for split, info in m["splits"].items() for s in info["shards"]}
        return [str((p.parent / n).resolve()) for n in split_of], m.get("classes"), split_of
    if p.is_dir():
        files = sorted(str(f.resolve()) for f in p.glob("*.tar"))
    else:
        from braceexpand import braceexpand

        files = sorted({str(Path(f).resolve()) for pat in braceexpand(spec) for f in glob.glob(pat)})
    if not files:
        raise SourceError(f"no .tar shard matches {spec}: give a brace pattern (data/train-{{000000..000099}}.tar), "
                          "a folder of .tar shards or a dataset.json")
    return files, None, {}


def _label_of(sample: dict[str, tuple], tar: tarfile.TarFile, label_key: str) -> str:
    ext, _, field = label_key.partition(":")
    if ext not in sample:
        return ""
    raw = tar.extractfile(sample[ext][0]).read(1 << 20)
    if not field:
        return raw.decode("utf-8", "replace").strip()
    try:
        value = json.loads(raw).get(field)
    except (ValueError, AttributeError):
        return ""
    return "" if value is None else str(value)


def list_shard(args: tuple[str, str]) -> dict:
    """Worker: one WebDataset shard -> a row per sample (its image member; the label read from `label_key`)."""
    path, label_key = args
    rows, rejects, shard = new_rows(), [], Path(path).name

    def flush(key: str | None, sample: dict) -> None:
        if key is None:
            return
        img = next((e for e in IMAGE_EXTS if e in sample), None)
        if img is None:
            rejects.append({"path": f"{shard}/{key}", "reason": "not_an_image", "detail": f"no image member in "
                            f"{sorted(sample)}"})
            return
        m = sample[img][0]
        add_row(rows, f"{shard}/{key}.{img}", m.offset_data, m.size, tar.extractfile(m), _label_of(sample, tar,
                                                                                                   label_key))

    try:
        with tarfile.open(path, mode="r:") as tar:
            key, sample = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                k, _, ext = m.name.partition(".")
                if k != key:
                    flush(key, sample)
                    key, sample = k, {}
                sample[ext.lower()] = (m,)
            flush(key, sample)
    except TAR_ERRORS as e:
        rejects.append({"path": shard, "reason": "not_a_tar", "detail": f"not a readable shard ({e})"})
    return pack(rows, rejects)


def list_shards(spec: str, label_key: str = "cls", imap: Callable = map, cache_dir: Path | None = None,
                nodes: tuple[int, int] = (0, 1)) -> Listing:
    """Existing WebDataset shards, for re-sharding: a shard per worker; a dataset.json's class names and splits
    are kept (an integer `.cls` names `classes[i]`)."""
    files, classes, split_of = shard_files(spec)
    tasks = [(f, label_key) for f in files]
    results = run_units(list_shard, tasks, [unit_fingerprint(f, label_key) for f in files],
                        [os.path.getsize(f) for f in files], cache_dir, imap, *nodes)
    labels = [str(x) for r in results for x in r["label"]]
    if classes is not None and label_key == "cls":
        labels = [classes[int(x)] if x.lstrip("-").isdigit() and 0 <= int(x) < len(classes) else "" for x in labels]
    names = [str(n) for r in results for n in r["name"]]
    rejects = [{"path": n, "reason": "unlabeled", "detail": f"no usable {label_key} label"}
               for n, lab in zip(names, labels, strict=True) if not lab]
    listing = _assemble(spec, results, rejects, labels, classes, kind="tar")
    listing.root = Path(files[0]).parent
    by_name = {Path(f).name: k for k, f in enumerate(files)}
    # _assemble saw one archive: point each entry at its own shard (the name's first part)
    listing.files = files
    listing.file_id = np.array([by_name[p.split("/")[0]] for p in listing.paths], np.int32)
    if split_of:
        listing.split_names = tuple(sort_splits(set(split_of.values())))
        sid = {s: i for i, s in enumerate(listing.split_names)}
        listing.split_ids = np.array([sid[split_of[p.split("/")[0]]] for p in listing.paths], np.int16)
    return listing
