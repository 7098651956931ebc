"""Network loss of one node of a two-host job (network namespaces; needs root, skips with the reason)."""

from __future__ import annotations

import pytest

from tests.faults.network import network_loss

pytestmark = pytest.mark.slow


def test_network_loss(ctx):
    out = network_loss(ctx)
    assert out.data_lost == 0 and out.exit_s is not None
