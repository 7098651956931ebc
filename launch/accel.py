"""`accelerate launch` configuration for the fine-tuning stage, from the same hostfile.

One YAML file serves every node (it holds machine 0's rank); each node's command overrides the rank with
`--machine_rank`, so the per-node commands differ only there.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

from launch.commands import Job
from launch.hostfile import Host


def accelerate_config(hosts: list[Host], master_addr: str, master_port: int, mixed_precision: str = "bf16",
                      gpus: bool = True) -> dict:
    """The accelerate config dict: multi-GPU (DDP) over all hosts, static rendezvous at the master."""
    slots = {h.slots for h in hosts}
    if len(slots) != 1:
        raise ValueError("accelerate launch needs the same number of processes on every node; "
                         f"the hostfile has slots {sorted(slots)}")
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": len(hosts),
        "num_processes": sum(h.slots for h in hosts),
        "machine_rank": 0,
        "main_process_ip": master_addr,
        "main_process_port": master_port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": mixed_precision,
        "use_cpu": not gpus,
        "gpu_ids": "all",
        "main_training_function": "main",
        "downcast_bf16": "no",
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
    }


def write_config(path: str | Path, config: dict) -> Path:
    """Write the config YAML atomically."""
    from runtime.io import atomic_write

    return atomic_write(path, yaml.safe_dump(config, sort_keys=False))


def accelerate_commands(config_path: str | Path, hosts: list[Host], job: Job) -> list[list[str]]:
    """Per-node `accelerate launch` argument lists (node i gets `--machine_rank i`)."""
    tail = {"module": ["-m", job.target], "script": [job.target], "program": ["--no_python", job.target]}[job.kind]
    return [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
             "--machine_rank", str(i), *tail, *job.args] for i in range(len(hosts))]


def format_commands(cmds: list[list[str]], hosts: list[Host]) -> str:
    """Shell lines to paste on each node (quoted)."""
    pairs = enumerate(zip(cmds, hosts, strict=True))
    return "".join(f"# node {i} ({h.name})\n{shlex.join(c)}\n" for i, (c, h) in pairs)
