"""Test shards in the shard format of docs/architecture.md (real JPEGs of sklearn digits), and a multi-process scenario.

`write_dataset` writes `{split}-{i:06d}.tar` shards with `webdataset.TarWriter` plus a `dataset.json`.
`python -m tests.stream_fixtures DATA OUT` (under torchrun) runs the stream scenarios of
tests/test_stream_dist.py on every rank and writes `OUT/rank{r}.json`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

IMAGE_WH = (64, 48)


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def make_jpeg(index: int, wh: tuple[int, int] = IMAGE_WH) -> tuple[bytes, int]:
    """A JPEG of digit `index` upscaled onto a colour-gradient canvas (R grows left to right, so flips show)."""
    images, targets = _digits()
    digit = images[index % len(images)] / 16.0
    w, h = wh
    canvas = np.zeros((h, w, 3), dtype=np.float32)
    canvas[..., 0] = np.linspace(0, 1, w)[None, :]
    canvas[..., 2] = np.linspace(0, 1, h)[:, None]
    up = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize((h, h), Image.Resampling.BILINEAR))
    canvas[:, (w - h) // 2:(w - h) // 2 + h, 1] = up / 255.0
    buf = io.BytesIO()
    Image.fromarray((canvas * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), int(targets[index % len(targets)])


def write_split(folder: Path, split: str, sizes: list[int], first_index: int = 0,
                corrupt: dict[str, str] | None = None) -> list[dict]:
    """Write one shard per entry of `sizes`; `corrupt` maps keys to a fault: "truncated" or "garbage" image
    bytes, "badlabel" (a non-integer .cls) or "noimage" (no image member)."""
    shards, index = [], first_index
    for s, n in enumerate(sizes):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as tar:
            for _ in range(n):
                key = f"{split}{index:06d}"
                jpg, label = make_jpeg(index)
                kind = (corrupt or {}).get(key)
                if kind == "truncated":
                    jpg = jpg[: len(jpg) // 3]
                elif kind == "garbage":
                    jpg = b"not an image" * 20
                meta = {"label": str(label), "src": f"{label}/{key}.jpg", "width": IMAGE_WH[0],
                        "height": IMAGE_WH[1], "sha256": hashlib.sha256(jpg).hexdigest()}
                sample = {"__key__": key, "jpg": jpg, "cls": str(label).encode(), "json": json.dumps(meta).encode()}
                if kind == "badlabel":
                    sample["cls"] = b"cat"
                elif kind == "noimage":
                    del sample["jpg"]
                tar.write(sample)
                index += 1
        data = (folder / name).read_bytes()
        shards.append({"name": name, "samples": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return shards


def write_dataset(folder: Path, splits: dict[str, list[int]], corrupt: dict[str, str] | None = None) -> Path:
    """Shards for each split (keys numbered across splits) and a contract `dataset.json`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_splits, label_counts, first = {}, {}, 0
    for split, sizes in splits.items():
        shards = write_split(folder, split, sizes, first, corrupt)
        labels = [true_label(f"{split}{i}") for i in range(first, first + sum(sizes))]
        meta_splits[split] = {"samples": sum(sizes), "shards": shards}
        label_counts[split] = np.bincount(labels, minlength=10).tolist()
        first += sum(sizes)
    manifest = {"format": "vitscale-shards/1", "classes": [str(c) for c in range(10)], "splits": meta_splits,
                "label_counts": label_counts, "rejects": {"count": 0, "by_reason": {}, "log": "rejects.jsonl"},
                "options": {"seed": 0}}
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return folder / "dataset.json"


def true_label(key: str) -> int:
    """The label `write_dataset` gave the sample `key` (keys are numbered from 0 across splits)."""
    targets = _digits()[1]
    return int(targets[int(key.lstrip("abcdefghijklmnopqrstuvwxyz")) % len(targets)])


def crc(images) -> int:
    """A checksum of a uint8 batch, to compare pixels (crops, flips) between runs."""
    return zlib.crc32(images.contiguous().numpy().tobytes())


def _run_scenarios(data: Path, out: Path) -> None:
    import torch.distributed as dist

    from data_prep.stream import DataCfg, build_loader
    from runtime.dist import detect, init_distributed, shutdown

    env = init_distributed(detect(), backend="gloo", timeout_s=120)
    cfg = DataCfg(path=str(data / "dataset.json"), workers=2)
    common = dict(dist_env=env, image_size=32, micro_batch=4, seed=7, with_keys=True)

    def train_loader():
        return build_loader(cfg, "train", train=True, global_batch=16, **common)

    def take(loader, n):  # n batches, crossing epoch boundaries as a trainer's step loop does
        got = []
        while len(got) < n:
            for images, labels, keys in loader:
                got.append({"keys": keys, "labels": labels.tolist(), "crc": crc(images),
                            "shape": list(images.shape), "dtype": str(images.dtype)})
                if len(got) == n:
                    break
        return got

    report: dict = {"rank": env.rank}
    a = train_loader()
    report["len"], report["steps"] = len(a), a.steps_per_epoch
    report["run"] = take(a, 2 * len(a))  # epochs 0 and 1
    report["epoch_after"] = a.epoch
    report["same_seed"] = take(train_loader(), len(a))
    report["resumed"] = {}
    for k in (3, len(a), len(a) + 3):  # inside epoch 0, at its end, inside epoch 1
        first = train_loader()
        head = take(first, k)
        state = [first.state_dict()]
        dist.broadcast_object_list(state, src=0)  # rank 0's state serves every rank
        first.close()
        second = train_loader()
        second.load_state_dict(state[0])
        report["resumed"][k] = head + take(second, 2 * len(a) - k)
    # rewind the same loader (persistent workers restarted mid-epoch)
    same = train_loader()
    head = take(same, 5)
    state = same.state_dict()
    take(same, 2)
    same.load_state_dict(state)
    report["rewound"] = head + take(same, 2 * len(a) - 5)
    ev = build_loader(cfg, "val", train=False, **common)
    report["eval"] = take(ev, len(ev))
    report["eval_stats"] = ev.stats
    (out / f"rank{env.rank}.json").write_text(json.dumps(report))
    shutdown()


if __name__ == "__main__":
    _run_scenarios(Path(sys.argv[1]), Path(sys.argv[2]))
