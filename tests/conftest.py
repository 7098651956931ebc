"""Shared test fixtures: free TCP ports and a helper to run real multi-process jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def torch_extensions_dir() -> Path:
    """The one DeepSpeed op cache: $TORCH_EXTENSIONS_DIR as the Makefile exports it, else the same project-local
    path, so a run of pytest without make neither builds the CPU comm op again nor into a second cache."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or ROOT / ".venv" / "torch_extensions")


# Every process a test starts inherits it (the trainers' ranks, launch's nodes).
os.environ["TORCH_EXTENSIONS_DIR"] = str(torch_extensions_dir())


def free_port() -> int:
    """A TCP port nobody listens on right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300, extra_env: dict | None = None,
                 nnodes: int = 1, node_rank: int | None = None, port: int | None = None,
                 session: bool = False) -> subprocess.Popen:
    """Start `torchrun ... args` on loopback and return the process (caller waits).

    `session`: in a new session (process group), so that killpg stops the whole "node" like a host going down.
    """
    port = port or free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
           "--master_addr=127.0.0.1", f"--master_port={port}"]
    if node_rank is not None:
        cmd.append(f"--node_rank={node_rank}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.Popen(cmd + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=session)


@pytest.fixture
def port() -> int:
    return free_port()


def write_digits_shards(root: Path) -> Path:
    """sklearn's 1797 real 8x8 digits, upscaled to 32 px PNGs, written as shards: ~80 % train, 20 % val."""
    from data_prep import write_example_images, write_shards

    write_example_images(root / "images", "digits", size=32)
    write_shards(root / "images", root / "shards", val_fraction=0.2, samples_per_shard=100, workers=1)
    return root / "shards" / "dataset.json"


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The digits shards (write_digits_shards), written once per test session."""
    return write_digits_shards(tmp_path_factory.mktemp("digits"))

