"""What every running vitscale job needs: distributed env, config, logging, meters, atomic writes.

The names below load on first use (PEP 562): `runtime.config` and `runtime.io` need no torch, so a tool
that only reads recipes (the launcher's preflight) does not pay seconds for importing it.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ConfigError": "config", "config_hash": "config", "load_config": "config", "save_config": "config",
    "to_dict": "config",
    "DistEnv": "dist", "accumulation_steps": "dist", "barrier": "dist", "detect": "dist",
    "init_distributed": "dist", "shutdown": "dist",
    "atomic_path": "io", "atomic_write": "io", "atomic_write_json": "io",
    "TBWriter": "logs", "get_logger": "logs", "setup_logging": "logs",
    "ThroughputMeter": "meters", "peak_flops": "meters",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"runtime.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
