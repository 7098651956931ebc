"""CI-sized run of the stream load scenario (tests/faults/stream_load.py), and its shard generator."""

from __future__ import annotations

import webdataset as wds

from tests.faults.stream_load import SAMPLES_PER_SHARD, stream_load, tiny_shards


def test_tiny_shards_read_as_the_contract_says(tmp_path):
    data = tiny_shards(tmp_path / "ds", 3)
    urls = sorted(str(p) for p in data.parent.glob("train-*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "cls"))
    assert len(samples) == 3 * SAMPLES_PER_SHARD
    assert [label for _, label in samples] == [i % 10 for i in range(3 * SAMPLES_PER_SHARD)]
    assert all(img.size == (16, 16) for img, _ in samples)


def test_stream_load(ctx):
    out = stream_load(ctx)
    assert out.data_lost == 0
    for rank in ("rank0", "rank1"):
        assert out.extra[rank]["epochs"] >= 2, out.extra  # sustained: the epochs wrap around several times
