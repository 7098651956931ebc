"""CI-sized runs of the stream fault scenarios (tests/faults/stream_faults.py)."""

from __future__ import annotations

import pytest

from tests.faults.stream_faults import bad_data_stream, unsafe_tar_member

pytestmark = pytest.mark.slow


def test_bad_data_stream(ctx):
    out = bad_data_stream(ctx)
    assert out.data_lost == 0, out.detail
    assert out.extra["faulty_samples"] >= 3  # the three bad samples plus the broken shards' samples


def test_unsafe_tar_member(ctx):
    out = unsafe_tar_member(ctx)
    assert out.data_lost == 0 and out.extra["unsafe_counted"] == 2
