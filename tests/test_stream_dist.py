"""data_prep.stream in a real job: 2 ranks (torchrun, gloo) x 2 DataLoader workers over 7 uneven shards.

One torchrun job runs every scenario (tests/stream_fixtures.py) and each rank reports what it yielded;
the tests below check the reports.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.conftest import run_torchrun
from tests.stream_fixtures import true_label, write_dataset

TRAIN_SHARDS = [13, 5, 9, 17, 3, 11, 6]  # 64 samples = 4 steps of global batch 16
VAL_SHARDS = [7, 10, 4]  # 21 samples: ranks hold 10 and 11, micro-batch 4 -> 3 batches each, padded


def _keys(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["keys"]]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("stream_dist")
    write_dataset(root / "data", {"train": TRAIN_SHARDS, "val": VAL_SHARDS})
    (root / "out").mkdir()
    proc = run_torchrun(["-m", "tests.stream_fixtures", str(root / "data"), str(root / "out")], nproc=2)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return [json.loads((root / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_equal_batches_and_each_sample_once_per_epoch(reports: list[dict]) -> None:
    # global 16 = micro 4 x accumulation 2 x world 2; 64 samples -> 4 steps -> 8 micro-batches per rank
    assert [(r["len"], r["steps"]) for r in reports] == [(8, 4), (8, 4)]
    for epoch in (0, 1):
        per_rank = [r["run"][epoch * 8:(epoch + 1) * 8] for r in reports]
        assert [len(b) for b in per_rank] == [8, 8]
        keys = _keys(per_rank[0]) + _keys(per_rank[1])
        assert sorted(keys) == [f"train{i:06d}" for i in range(64)]  # none twice, none missing
    for r in reports:
        assert r["epoch_after"] == 2
        for b in r["run"]:
            assert b["shape"] == [4, 3, 32, 32] and b["dtype"] == "torch.uint8"
            assert b["labels"] == [true_label(k) for k in b["keys"]]


def test_order_changes_per_epoch_and_repeats_per_seed(reports: list[dict]) -> None:
    for r in reports:
        assert _keys(r["run"][:8]) != _keys(r["run"][8:])
        assert r["same_seed"] == r["run"][:8]  # keys, labels and pixels (crops, flips)
    assert set(_keys(reports[0]["run"][:8])) != set(_keys(reports[0]["run"][8:]))  # ranks' shares change


@pytest.mark.parametrize("k", ["3", "8", "11"])
def test_resume_yields_what_an_uninterrupted_run_would(reports: list[dict], k: str) -> None:
    # stop after k micro-batches (inside epoch 0, at its end, inside epoch 1), rebuild, load rank 0's state
    for r in reports:
        assert len(r["resumed"][k]) == 16
        assert r["resumed"][k] == r["run"]


def test_rewinding_a_running_loader(reports: list[dict]) -> None:
    # load_state_dict on the same loader while its persistent workers are mid-epoch
    for r in reports:
        assert r["rewound"] == r["run"]


def test_eval_sees_every_sample_once_with_equal_batch_counts(reports: list[dict]) -> None:
    assert [len(r["eval"]) for r in reports] == [3, 3]
    pairs = [(k, lab) for r in reports for b in r["eval"] for k, lab in zip(b["keys"], b["labels"], strict=True)]
    real = [k for k, _ in pairs if k]
    assert sorted(real) == [f"val{i:06d}" for i in range(64, 85)]
    assert all(lab == true_label(k) for k, lab in pairs if k)
    assert Counter(lab for k, lab in pairs if not k) == {-1: 3}  # 24 slots - 21 samples
    assert sum(r["eval_stats"]["padding"] for r in reports) == 3
