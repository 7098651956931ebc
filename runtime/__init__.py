"""What every running vitscale job needs: distributed env, config, logging, meters, atomic writes."""

from runtime.config import ConfigError, config_hash, load_config, save_config, to_dict
from runtime.dist import DistEnv, accumulation_steps, barrier, detect, init_distributed, shutdown
from runtime.io import atomic_path, atomic_write, atomic_write_json
from runtime.logs import TBWriter, get_logger, setup_logging
from runtime.meters import ThroughputMeter, peak_flops

__all__ = [
    "ConfigError",
    "DistEnv",
    "TBWriter",
    "ThroughputMeter",
    "accumulation_steps",
    "atomic_path",
    "atomic_write",
    "atomic_write_json",
    "barrier",
    "config_hash",
    "detect",
    "get_logger",
    "init_distributed",
    "load_config",
    "peak_flops",
    "save_config",
    "setup_logging",
    "shutdown",
    "to_dict",
]
