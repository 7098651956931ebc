"""The distributed environment of a running job, from torchrun, DeepSpeed's launcher or SLURM.

`detect()` reads the variables each launcher sets; `init_distributed()` starts the process group
(NCCL on GPUs, gloo on CPU); `shutdown()` tears it down. One process per GPU throughout.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "none"  # torchrun | deepspeed | slurm | none

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return default


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: `gpu[003-005,9],cpu1` -> `gpu003`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the distributed environment; a plain `python` run is rank 0 of 1."""
    env = os.environ if environ is None else environ
    addr = env.get("MASTER_ADDR", "127.0.0.1")
    port = _int(env, "MASTER_PORT", default=29500)
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, or set by hand
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else ("deepspeed" if "CROSS_RANK" in env else "env")
        return DistEnv(
            rank=rank,
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", default=rank % local_world),
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", "CROSS_RANK", default=rank // local_world),
            num_nodes=_int(env, "CROSS_SIZE", default=max(1, world // local_world)),
            master_addr=addr,
            master_port=port,
            launcher=launcher,
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:  # srun, one task per GPU
        world = int(env["SLURM_NTASKS"])
        nodes = _int(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=1)
        if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
            addr = first_host(env["SLURM_JOB_NODELIST"])
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=_int(env, "SLURM_NTASKS_PER_NODE", default=world // nodes),
            node_rank=_int(env, "SLURM_NODEID", default=0),
            num_nodes=nodes,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return DistEnv()


def init_distributed(env: DistEnv | None = None, backend: str | None = None, timeout_s: float = 600,
                     single: bool = False) -> DistEnv:
    """Start the default process group for `env` (detected if None).

    A single process gets no group unless `single=True` (DeepSpeed needs one even then; it is made on an
    in-memory store, so no port is taken and no file is left). `timeout_s` bounds every collective: when a
    peer dies, the others fail within it instead of hanging.
    """
    env = env or detect()
    if torch_dist.is_initialized() or not (env.is_distributed or single):
        return env
    # Libraries that read the environment (DeepSpeed wants LOCAL_RANK) see what we detected, under srun too.
    # A one-process group exports no MASTER_*: others would read it as a port to bind.
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE") + (
        ("MASTER_ADDR", "MASTER_PORT") if env.is_distributed else ())
    for name in names:
        os.environ.setdefault(name, str(getattr(env, name.lower())))
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    # One process rendezvous with itself in memory: no port taken, no store file left behind (a file store's
    # file outlived every run that ended without tearing the group down).
    where = ({"init_method": f"tcp://{env.master_addr}:{env.master_port}"} if env.is_distributed
             else {"store": torch_dist.HashStore()})
    timeout = datetime.timedelta(seconds=timeout_s)
    torch_dist.init_process_group(
        backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"),
        **where,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    # Groups made later without a timeout (DeepSpeed's ZeRO data-parallel group is `new_group(ranks)`, a clone
    # of the world) get torch's module defaults, 30 min (gloo) / 10 min (NCCL), not the world group's: a rank
    # waiting there for a peer that dropped off the network would hang that long. torch has no setter; its
    # `_get_default_timeout` reads these two module globals at each new_group call.
    c10d = torch_dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    return env


def is_distributed() -> bool:
    """Whether a process group is up (torch built with distributed support, and initialised)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        torch_dist.barrier()


def all_gather_objects(obj: object) -> list:
    """Every rank's `obj` (picklable, from our own ranks only), in rank order, on every rank; `[obj]` when not
    distributed."""
    if not is_distributed():
        return [obj]
    out: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def main_decides(fn: Callable[[], str | None], env: DistEnv) -> str | None:
    """`fn()` on rank 0 (an error message, or None when all is well), returned on every rank (a broadcast when
    distributed): what only rank 0 can check then stops every rank alike, none left waiting on a peer that left."""
    result = fn() if env.is_main else None
    if is_distributed() and env.world_size > 1:
        box = [result]
        torch_dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def shutdown() -> None:
    """Tear down the process group if one is up."""
    if is_distributed():
        torch_dist.destroy_process_group()


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps so that micro x accumulation x world == global, else a clear error."""
    per_step = micro_batch * world_size
    if global_batch <= 0 or micro_batch <= 0:
        raise ValueError(f"batch sizes must be positive (global {global_batch}, micro {micro_batch})")
    if global_batch % per_step:
        lo = max(per_step, global_batch // per_step * per_step)
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro-batch {micro_batch} x world size "
            f"{world_size} = {per_step}; use a global batch of {lo} or {lo + per_step}, or change the micro-batch"
        )
    return global_batch // per_step
