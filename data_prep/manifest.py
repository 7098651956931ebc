"""The manifest: `dataset.json` (the shard contract), timm's `_info.json`, `rejects.jsonl`, and `merge`.

Every finished shard leaves a receipt (`.parts/shards/<name>.json`: samples, bytes, sha256, label
counts, rejects, image sizes) and every run leaves the plan (`.parts/plan.json`: classes, shard names,
rejects found before writing, options). The manifest is built from those alone, so one node, many
nodes (`merge`) and a resumed run all produce the same bytes. `dataset.json` is written last, atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from runtime.io import atomic_write, atomic_write_json
from runtime.lock import DirLock
from runtime.progress import progress_bar

FORMAT = "vitscale-shards/1"
PARTS = ".parts"
SIZE_BINS = (0, 32, 64, 128, 256, 384, 512, 1024, 2048)  # shorter-side histogram bin edges, pixels


class ManifestError(ValueError):
    """A shard folder's manifest is missing, unreadable or not in the contract's shape, or cannot be built yet
    (missing shards or plan)."""


def parts_dir(out: str | os.PathLike) -> Path:
    return Path(out) / PARTS


def receipt_path(out: str | os.PathLike, name: str) -> Path:
    return parts_dir(out) / "shards" / f"{name}.json"


def load_json(path: str | os.PathLike) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_format(meta: object, path: str | os.PathLike) -> dict:
    """`meta`, a parsed dataset.json, if it has the contract's format and the shape its readers index (splits of
    shards with names and sample counts, a class list); else a ManifestError naming what is wrong and the fix."""
    got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if got != FORMAT:
        raise ManifestError(f"{path}: format {got!r} is not {FORMAT!r}: not a dataset.json written by data_prep; "
                            "write the shards with `python -m data_prep write SRC OUT`")
    splits = meta.get("splits")
    shaped = isinstance(splits, dict) and isinstance(meta.get("classes", []), list) and all(
        isinstance(info, dict) and isinstance(info.get("shards"), list)
        and all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("samples"), int)
                for s in info["shards"]) for info in splits.values())
    if not shaped:
        raise ManifestError(f"{path}: `splits` or `classes` is not in the shape data_prep writes (split -> "
                            "{samples, shards: [{name, samples}]}; a list of class names): the file was edited; "
                            "rerun the `python -m data_prep write` command to write it again")
    return meta


def load_manifest(out: str | os.PathLike) -> dict:
    """OUT/dataset.json for the verbs that read a shard folder back (verify, stats, preview).

    The one place a missing or unreadable manifest becomes a one-line `ManifestError` naming the folder and
    the fix, instead of a raw `[Errno 2]`."""
    folder = Path(out)
    path = folder / "dataset.json"
    if folder.is_file():
        raise ManifestError(f"{folder} is a file: give the shard folder that holds dataset.json "
                            f"({folder.parent if folder.name == 'dataset.json' else 'the OUT of `write`'})")
    try:
        return read_manifest(path)
    except FileNotFoundError:
        if (parts_dir(folder) / "plan.json").exists():
            raise ManifestError(f"{folder} has no dataset.json yet: its write did not finish; rerun the same "
                                f"`python -m data_prep write` command (or `python -m data_prep merge {folder}` once "
                                "every node of a multi-node write is done)") from None
        if folder.is_dir() and any(folder.glob("*.tar")):
            raise ManifestError(f"{folder} holds .tar shards but no dataset.json: write them into a shard folder "
                                f"with `python -m data_prep write {folder} OUT` first") from None
        raise ManifestError(f"no dataset.json or shards in {folder}: run `python -m data_prep write SRC {folder}` "
                            "first") from None
    except OSError as e:
        raise ManifestError(f"{path}: cannot be read ({e.strerror or e}): check its permissions") from None


def read_manifest(path: str | os.PathLike) -> dict:
    """A dataset.json file, parsed and checked (check_format): what every reader of the contract loads. A file
    that is not JSON is a ManifestError; a missing one FileNotFoundError, as open() raises it."""
    try:
        meta = load_json(path)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ManifestError(f"{path} is not valid JSON ({e}): rerun the `python -m data_prep write` command (or "
                            f"`python -m data_prep merge {Path(path).parent}` after a multi-node write) to write it "
                            "again") from None
    return check_format(meta, path)


@contextlib.contextmanager
def claim_output(out: str | os.PathLike, node_rank: int = 0, num_nodes: int = 1) -> Iterator[None]:
    """Hold OUT for a write (runtime/lock.py, files in OUT/.parts) until the block ends: a single-node write or
    `merge` alone; node i of a multi-node write together with the other nodes, and its rank alone. Another job
    holding what this one needs is a ManifestError naming it: two writers would delete each other's temporary
    files and race on the plan."""
    parts = parts_dir(out)
    locks = [DirLock(parts, shared=num_nodes > 1)] + ([DirLock(parts, f".lock-node-{node_rank}")] if num_nodes > 1
                                                        else [])
    try:
        for lock in locks:
            if holder := lock.acquire():
                what = f"node {node_rank} of {out}" if lock is not locks[0] else str(out)
                raise ManifestError(f"{what} is being written by another data_prep job ({holder}); wait for it to "
                                    "end, or write to another folder")
        yield
    finally:
        for lock in locks:
            lock.release()


def load_receipt(out: str | os.PathLike, name: str, fingerprint: str) -> dict | None:
    """A finished shard's receipt, or None if the shard is not (or not for this plan) complete."""
    try:
        receipt = load_json(receipt_path(out, name))
    except (OSError, ValueError):
        return None
    if receipt.get("fingerprint") != fingerprint:
        return None
    try:
        if os.path.getsize(Path(out) / name) != receipt["bytes"]:
            return None
    except OSError:
        return None
    return receipt


def size_bin(short_side: int) -> str:
    """Label of the shorter-side histogram bin, e.g. `256-383`."""
    lo = max(b for b in SIZE_BINS if b <= short_side)
    i = SIZE_BINS.index(lo)
    return f"{lo}-{SIZE_BINS[i + 1] - 1}" if i + 1 < len(SIZE_BINS) else f">={lo}"


def _merge_stats(into: dict, s: dict) -> None:
    if not s.get("n"):
        return
    if not into.get("n"):
        into.update(n=0, width_min=s["width_min"], width_max=0, height_min=s["height_min"], height_max=0,
                    width_sum=0, height_sum=0, image_bytes=0, shorter_side=Counter())
    into["n"] += s["n"]
    for k in ("width_sum", "height_sum", "image_bytes"):
        into[k] += s[k]
    for k in ("width", "height"):
        into[f"{k}_min"] = min(into[f"{k}_min"], s[f"{k}_min"])
        into[f"{k}_max"] = max(into[f"{k}_max"], s[f"{k}_max"])
    into["shorter_side"].update(s["shorter_side"])


def _image_stats(stats: dict) -> dict:
    if not stats.get("n"):
        return {"n": 0}
    n = stats["n"]
    bins = sorted(stats["shorter_side"], key=lambda b: int(b.strip(">=").split("-")[0]))
    return {"n": n, "width": [stats["width_min"], round(stats["width_sum"] / n, 1), stats["width_max"]],
            "height": [stats["height_min"], round(stats["height_sum"] / n, 1), stats["height_max"]],
            "mean_bytes": round(stats["image_bytes"] / n), "shorter_side": {b: stats["shorter_side"][b] for b in bins}}


def build_manifest(plan: dict, receipts: dict[str, dict]) -> tuple[dict, list[dict]]:
    """dataset.json content and the sorted reject log from the plan and every shard's receipt."""
    n_cls = len(plan["classes"])
    splits, label_counts, image_stats, rejects = {}, {}, {}, list(plan["rejects"])
    for split, names in plan["splits"].items():
        counts, stats, shards = [0] * n_cls, {}, []
        for name in names:
            r = receipts[name]
            shards.append({"name": name, "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]})
            for c, k in r["label_counts"].items():
                counts[int(c)] += k
            _merge_stats(stats, r["image_stats"])
            rejects.extend(r["rejects"])
        splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
        label_counts[split] = counts
        image_stats[split] = _image_stats(stats)
    rejects.sort(key=lambda r: (r["path"], r["reason"]))
    manifest = {
        "format": FORMAT,
        "classes": plan["classes"],
        "splits": splits,
        "label_counts": label_counts,
        "rejects": {"count": len(rejects), "by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
                    "log": "rejects.jsonl"},
        "options": plan["options"],
        "image_stats": image_stats,
    }
    if plan.get("class_names"):  # --class-names: human names beside the ids, by index
        manifest["class_names"] = plan["class_names"]
    if plan["options"].get("min_per_class"):  # --min-per-class: the classes left out and their image counts
        manifest["dropped_classes"] = {"min_per_class": plan["options"]["min_per_class"],
                                       "count": len(plan.get("dropped_classes") or {}),
                                       "images": sum((plan.get("dropped_classes") or {}).values()),
                                       "classes": plan.get("dropped_classes") or {}}
    return manifest, rejects


def timm_info(manifest: dict, name: str) -> dict:
    """timm's `_info.json`, so `timm.data.create_dataset("wds/...", root=OUT, split=...)` reads the shards."""
    return {
        "name": name,
        "num_classes": len(manifest["classes"]),
        "splits": {split: {"name": split, "num_samples": s["samples"], "filenames": [x["name"] for x in s["shards"]],
                           "shard_lengths": [x["samples"] for x in s["shards"]]}
                   for split, s in manifest["splits"].items()},
    }


def finalize(out: str | os.PathLike, progress: bool = False) -> dict:
    """Write rejects.jsonl, _info.json, then dataset.json (atomically, last) from the plan and receipts;
    `progress`: a bar over the shards' receipts (runtime.progress: rank 0's terminal only)."""
    out = Path(out)
    try:
        plan = load_json(parts_dir(out) / "plan.json")
    except OSError:
        raise ManifestError(f"{out} has no {PARTS}/plan.json: run `python -m data_prep write SRC {out}` first"
                            ) from None
    receipts, missing = {}, []
    names = [name for split in plan["splits"].values() for name in split]
    for name in progress_bar(names, desc="merge", unit="shard", enabled=progress):
        r = load_receipt(out, name, plan["shard_fingerprints"][name])
        if r is None:
            missing.append(name)
        else:
            receipts[name] = r
    if missing:
        raise ManifestError(f"{len(missing)} of {len(plan['shard_fingerprints'])} shards are not finished "
                            f"(e.g. {', '.join(missing[:4])}): run `write` again on the node(s) that own them "
                            "(shard i of the global list belongs to node i mod --num-nodes), then merge")
    manifest, rejects = build_manifest(plan, receipts)
    atomic_write(out / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    atomic_write_json(out / "_info.json", timm_info(manifest, out.resolve().name))
    atomic_write_json(out / "dataset.json", manifest)
    return manifest


def merge(out: str | os.PathLike, progress: bool = False) -> dict:
    """`python -m data_prep merge OUT`: the final manifest once every node has written its shards."""
    if not (parts_dir(out) / "plan.json").is_file():
        return finalize(out, progress)  # its one-line error, with nothing created
    with claim_output(out):
        return finalize(out, progress)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def summary_table(manifest: dict, seconds: float | None = None, processed: int | None = None) -> str:
    """The end-of-run table: samples, shards and bytes per split; rejects by reason; time and img/s."""
    rows = [f"{'split':<10} {'samples':>10} {'shards':>7} {'bytes':>10}"]
    for split, s in manifest["splits"].items():
        rows.append(f"{split:<10} {s['samples']:>10} {len(s['shards']):>7} "
                    f"{human_bytes(sum(x['bytes'] for x in s['shards'])):>10}")
    rej = manifest["rejects"]
    rows.append(f"rejects: {rej['count']}" + (" (" + ", ".join(f"{k} {v}" for k, v in rej["by_reason"].items())
                                             + f"; see {rej['log']})" if rej["count"] else ""))
    dropped = manifest.get("dropped_classes")
    if dropped:
        rows.append(f"dropped classes: {dropped['count']} with fewer than {dropped['min_per_class']} images "
                    f"({dropped['images']} images; listed in dataset.json)")
    if seconds is not None:
        rate = f", {processed / max(seconds, 1e-9):.0f} img/s over {processed} images" if processed else ""
        rows.append(f"time: {seconds:.1f} s{rate}")
    return "\n".join(rows)
