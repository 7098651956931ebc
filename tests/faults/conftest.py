"""Fixtures of the fault suite: a CI-sized trial context over the shared digits shards."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.faults.harness import Ctx


@pytest.fixture(scope="session")
def fault_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-cache")


@pytest.fixture
def ctx(tmp_path: Path, digits_shards: Path, fault_cache: Path) -> Ctx:
    """A CI-sized trial with fixed random draws (seed 0), so a failure reruns identically."""
    return Ctx(work=tmp_path, rng=random.Random(0), full=False, digits=digits_shards, cache=fault_cache)
