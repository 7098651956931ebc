"""CI-sized runs of the shard-writer fault scenarios (tests/faults/shards.py)."""

from __future__ import annotations

import pytest

from tests.faults.shards import disk_full_shards, shard_writer_kill

pytestmark = pytest.mark.slow


def test_shard_writer_kill(ctx):
    out = shard_writer_kill(ctx)
    assert out.data_lost == 0
    assert out.extra["kills"] >= 1, out.detail  # at least one kill really hit a running writer


def test_disk_full_shards(ctx):
    out = disk_full_shards(ctx)
    assert out.data_lost == 0
    assert out.extra["shards_before_full"] >= 1
