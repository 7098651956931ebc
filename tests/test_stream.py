"""data_prep.stream in one process: ranks simulated with DistEnv, DataLoader workers real.

Covers the layout arithmetic, faults, the device-decode path, eval padding, URL sources, resampling,
the state checks and the clear errors. The 2-rank gloo job is in test_stream_dist.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_prep.stream import DataCfg, build_loader
from data_prep.stream_worker import ShardStream
from runtime.dist import DistEnv
from tests.stream_fixtures import crc, true_label, write_dataset

TRAIN_SHARDS = [13, 5, 9, 17, 3, 11, 6]
VAL_SHARDS = [7, 10, 4]
CORRUPT = {"train000002": "truncated", "train000007": "garbage", "train000015": "badlabel",
           "train000022": "noimage", "val000066": "truncated"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("stream") / "ds", {"train": TRAIN_SHARDS, "val": VAL_SHARDS})


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("stream_bad") / "ds", {"train": TRAIN_SHARDS, "val": VAL_SHARDS},
                         corrupt=CORRUPT)


DATA_FIELDS = {f.name for f in dataclasses.fields(DataCfg)}


def loader(source, split="train", rank=0, world=1, **kw):
    """A loader over `source` with the tests' defaults; `kw` mixes DataCfg fields and build_loader arguments."""
    train = kw.pop("train", split == "train")
    data = DataCfg(**{"path": source, "workers": 2, **{k: kw.pop(k) for k in list(kw) if k in DATA_FIELDS}})
    opts = dict(image_size=32, micro_batch=4, seed=7, with_keys=True, global_batch=16 if train else None)
    opts.update(kw)
    return build_loader(data, split, train=train, dist_env=DistEnv(rank=rank, world_size=world), **opts)


def epoch(ld) -> list[tuple]:
    return [(keys, labels, images) for images, labels, keys in ld]


def test_remainder_is_left_out_never_repeated(data: Path) -> None:
    # global 24 = 4 x 3 x 2: 64 samples -> 2 steps -> 6 micro-batches per rank, 48 samples, 16 left out
    lds = [loader(data, rank=r, world=2, global_batch=24) for r in (0, 1)]
    assert [(len(ld), ld.steps_per_epoch) for ld in lds] == [(6, 2), (6, 2)]
    keys = [k for ld in lds for ks, _, _ in epoch(ld) for k in ks]
    assert len(keys) == 48 and len(set(keys)) == 48


def test_workers_zero_resume_is_exact(data: Path) -> None:
    def seen(batches: list[tuple]) -> list[tuple]:
        return [(tuple(keys), crc(images)) for keys, _, images in batches]

    ref = loader(data, workers=0)
    whole = seen(epoch(ref) + epoch(ref))  # epochs 0 and 1: 16 micro-batches each (accumulation 4)
    assert len(whole) == 32 and whole[:16] != whole[16:]
    assert seen(epoch(loader(data, workers=0))) == whole[:16]  # same seed, same keys and pixels
    for k in (5, 16, 21):
        first = loader(data, workers=0)
        head = seen(epoch(first)) if k >= 16 else []
        head += [(tuple(keys), crc(images)) for images, _, keys in itertools.islice(first, k - len(head))]
        second = loader(data, workers=0)
        second.load_state_dict(first.state_dict())
        rest = seen(epoch(second))
        if len(head) + len(rest) < 32:
            rest += seen(epoch(second))
        assert head + rest == whole, k


def _fault_epoch(source: Path, decode: str) -> tuple[list[tuple[str, int]], list[dict]]:
    lds = [loader(source, rank=r, world=2, decode=decode, device="cpu") for r in (0, 1)]
    batches = [epoch(ld) for ld in lds]
    assert [len(b) for b in batches] == [8, 8]  # the epoch completes on both ranks
    pairs = [(k, int(lab)) for b in batches for ks, labels, _ in b for k, lab in zip(ks, labels, strict=True)]
    assert len(pairs) == 64 and all(lab == true_label(k) for k, lab in pairs)  # substitutes keep their label
    assert not {k for k, _ in pairs} & {k for k in CORRUPT if k.startswith("train")}
    stats = [ld.stats for ld in lds]
    # a fault is counted once, by the reader whose share holds it; it is replaced wherever it is read
    assert sum(s["skipped"] for s in stats) <= sum(s["substituted"] for s in stats)
    assert sum(s["samples"] + s["substituted"] for s in stats) == 64
    return pairs, stats


def _reasons(stats: list[dict]) -> Counter:
    total: Counter = Counter()
    for s in stats:
        total.update(s["by_reason"])
    return total


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_faulty_samples_are_replaced_and_counted(bad_data: Path, decode: str) -> None:
    pairs, stats = _fault_epoch(bad_data, decode)
    assert sum(s["skipped"] for s in stats) == sum(s["substituted"] for s in stats)  # no share overran
    assert _reasons(stats) == {"corrupt_image": 2, "bad_label": 1, "missing_image": 1, "too_small": 0,
                               "truncated_shard": 0, "unreadable_shard": 0, "unsafe_member": 0}
    assert len({k for k, _ in pairs}) == 60  # each fault replaced by a neighbour of its micro-batch


def test_truncated_shard_and_corrupt_jpeg_never_fatal(bad_data: Path, tmp_path: Path) -> None:
    shutil.copytree(bad_data.parent, tmp_path / "ds")
    shard = tmp_path / "ds" / "train-000003.tar"  # samples 27..43: cut in the middle
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])
    pairs, stats = _fault_epoch(tmp_path / "ds" / "dataset.json", "cpu")
    reasons = _reasons(stats)
    # a reader whose share was cut short reads on into the following samples, but each fault counts once
    assert reasons == {"corrupt_image": 2, "bad_label": 1, "missing_image": 1, "too_small": 0, "truncated_shard": 1,
                       "unreadable_shard": 0, "unsafe_member": 0}
    assert "train000043" not in {k for k, _ in pairs}  # lost with the end of the shard
    assert any(name.endswith("train-000003.tar") for s in stats for name in s["shards_with_errors"])


def test_eval_fault_becomes_label_minus_one(bad_data: Path) -> None:
    ld = loader(bad_data, "val", decode="cpu")
    pairs = [(k, int(lab)) for ks, labels, _ in epoch(ld) for k, lab in zip(ks, labels, strict=True)]
    assert ("", -1) in pairs and "val000066" not in dict(pairs)
    assert ld.stats["filler"] == 1 and ld.stats["by_reason"]["corrupt_image"] == 1
    assert sorted(k for k, _ in pairs if k) == [f"val{i:06d}" for i in range(64, 85) if i != 66]


@pytest.mark.parametrize("train", [True, False])
def test_gpu_decode_path_matches_cpu_path(data: Path, train: bool) -> None:
    split = "train" if train else "val"
    cpu = epoch(loader(data, split, workers=1, image_size=(24, 32), decode="cpu"))
    dev = epoch(loader(data, split, workers=1, image_size=(24, 32), decode="gpu", device="cpu"))
    assert len(cpu) == len(dev) > 0
    for (k1, l1, x1), (k2, l2, x2) in zip(cpu, dev, strict=True):
        assert k1 == k2 and torch.equal(l1, l2) and l2.dtype == torch.int64
        assert x2.shape == x1.shape == (4, 3, 24, 32) and x2.dtype == torch.uint8
        # same crop boxes and flips: only the resampling kernels differ (a flip alone differs by tens)
        assert (x1.float() - x2.float()).abs().mean() < 2.0


def test_eval_three_ranks_each_sample_once(data: Path) -> None:
    lds = [loader(data, "val", rank=r, world=3, micro_batch=2) for r in range(3)]
    batches = [epoch(ld) for ld in lds]
    assert [len(b) for b in batches] == [4, 4, 4]  # 21 / 3 = 7 per rank -> 4 batches of 2, one padded slot
    keys = [k for b in batches for ks, _, _ in b for k in ks]
    assert sorted(k for k in keys if k) == [f"val{i:06d}" for i in range(64, 85)] and keys.count("") == 3


def test_too_few_shards_error_and_resampled_mode(data: Path, tmp_path: Path) -> None:
    small = write_dataset(tmp_path / "small", {"train": [9, 23]})
    with pytest.raises(ValueError, match=r"2 shards for 2 ranks x 2 workers = 4 readers.*resampled=True"):
        loader(small, rank=0, world=2)
    lds = [loader(small, rank=r, world=2, resampled=True) for r in (0, 1)]
    assert [len(ld) for ld in lds] == [4, 4]  # 32 // 16 = 2 steps x 2 accumulation
    for ld in lds:
        e0, e1 = epoch(ld), epoch(ld)
        assert len(e0) == len(e1) == 4
        keys = [k for ks, labels, _ in e0 + e1 for k in ks]
        assert {k[:5] for k in keys} == {"train"} and [k for ks, _, _ in e0 for k in ks] != keys[16:]


def test_url_list_sources(data: Path) -> None:
    folder = data.parent
    pattern = str(folder / "train-{000000..000006}.tar")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        loader(pattern)
    with pytest.raises(ValueError, match="dataset.json"):
        loader(pattern, "val", train=False)
    ld = loader(pattern, samples_per_epoch=64, workers=1)
    assert sum(len(ks) for ks, _, _ in epoch(ld)) == 64
    piped = [f"pipe:cat {folder / f'train-{i:06d}.tar'}" for i in range(7)]
    ld = loader(piped, samples_per_epoch=32, workers=1)
    keys = [k for ks, labels, _ in epoch(ld) for k in ks]
    assert len(keys) == 32 and len(set(keys)) == 32


def test_state_checks(data: Path) -> None:
    a = loader(data, workers=0)
    for _ in itertools.islice(a, 3):
        pass
    state = a.state_dict()
    assert (state["epoch"], state["position"], state["world_size"], state["workers"]) == (0, 3, 1, 1)
    b = loader(data, workers=2)
    with pytest.raises(ValueError, match=r"workers=1 \(now 2\).*strict=False"):
        b.load_state_dict(state)
    b.load_state_dict(state, strict=False)  # same share of the epoch with the new layout
    assert (b.epoch, b.position) == (0, 3)
    with pytest.raises(ValueError, match="not a stream state"):
        b.load_state_dict({"epoch": 1})


def test_bad_arguments_and_sources(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not divisible by micro-batch 4 x world size 2"):
        loader(data, world=2, global_batch=12)
    with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'val'\]"):
        loader(data, "test")
    with pytest.raises(ValueError, match="less than one global batch"):
        loader(data, samples_per_epoch=8)
    with pytest.raises(FileNotFoundError, match="shard paths do not exist"):
        loader(str(tmp_path / "nope-{0..3}.tar"), samples_per_epoch=8)
    with pytest.raises(ValueError, match="decode must be"):
        loader(data, decode="tpu")


def test_unreadable_shards_are_counted_and_all_unreadable_is_an_error(data: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(data.parent, copy)
    ld = loader(copy / "dataset.json", workers=1)
    (copy / "train-000004.tar").unlink()  # vanishes after the loader was built
    assert len(epoch(ld)) == 16 and ld.stats["by_reason"]["unreadable_shard"] >= 1
    for i in range(len(TRAIN_SHARDS)):
        (copy / f"train-{i:06d}.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="gave no sample"):
        epoch(loader(copy / "dataset.json", workers=0))


def test_num_classes_bounds_the_labels(data: Path) -> None:
    assert loader(data).num_classes == 10 and loader(data, num_classes=12).num_classes == 12
    with pytest.raises(ValueError, match="num_classes 5 is less than the 10 classes"):
        loader(data, num_classes=5)
    # a URL list has no class list: labels at or over num_classes are bad labels, replaced like any fault
    pattern = str(data.parent / "train-{000000..000006}.tar")
    ld = loader(pattern, samples_per_epoch=64, workers=1, num_classes=5)
    labels = [int(lab) for _, ls, _ in epoch(ld) for lab in ls]
    assert len(labels) == 64 and max(labels) < 5
    # replaced by a good neighbour, or by a label -1 filler in a micro-batch with none
    assert ld.stats["by_reason"]["bad_label"] == ld.stats["substituted"] + ld.stats["filler"] > 0


def _seen(batches) -> list[tuple]:
    return [(tuple(keys), crc(images)) for images, _, keys in batches]


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_training_workers_run_on_between_epochs_in_the_same_order(data: Path, decode: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 micro-batches per epoch over 3 workers: the next epoch's batch 0 falls to the worker after the one that
    # made this epoch's last batch (16 % 3 = 1), so the slots rotate from epoch to epoch
    starts = []
    monkeypatch.setattr(ShardStream, "set_position", lambda self, e, b: starts.append((e, b)) or
                        self.position.copy_(torch.tensor([e, b])))
    kw = dict(workers=3, decode=decode, device="cpu")
    ld = loader(data, **kw)
    three = _seen(ld) + _seen(ld) + _seen(ld)
    assert len(three) == 48 and starts == [(0, 0)]  # started once: the workers ran on into epochs 1 and 2
    ref = []  # the same epochs from workers started at each epoch's beginning
    for e in range(3):
        fresh = loader(data, **kw)
        fresh.load_state_dict({**fresh.state_dict(), "epoch": e})
        ref += _seen(fresh)
        fresh.close()
    assert three == ref
    # a pass left mid-epoch: the next one restarts the workers at its position, and the order is the same
    starts.clear()
    again = loader(data, **kw)
    head = _seen(again) + _seen(itertools.islice(again, 5))
    assert head + _seen(again) + _seen(again) == three and starts == [(0, 0), (1, 5)]
    ld.close()
    again.close()
