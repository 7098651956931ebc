"""Imports every scenario module of this folder so that their scenarios register (see harness.SCENARIOS)."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

NOT_SCENARIOS = {"harness", "catalog", "conftest"}


def load_all() -> dict:
    """Import every scenario module (any module here but tests, the harness and this one); returns SCENARIOS."""
    from tests.faults.harness import SCENARIOS

    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if mod.name not in NOT_SCENARIOS and not mod.name.startswith("test_"):
            importlib.import_module(f"tests.faults.{mod.name}")
    return SCENARIOS
