"""SLURM: the sbatch script, and `srun` + torchrun inside an allocation.

The batch script is short: `#SBATCH` lines, the exported environment, then
`exec python -m launch run --launcher slurm ...`. That step runs `srun` with one task per node; each task
is `launch node --slurm-torchrun`, which starts torchrun with `--node-rank=$SLURM_NODEID` and the master
address of the first node of SLURM_JOB_NODELIST.

Preemption: the script asks for `--requeue` and `--signal=B:USR1@GRACE`. SLURM sends SIGUSR1 to the batch
step GRACE seconds before the time limit; the launcher forwards it to the ranks (the trainer checkpoints
and exits) and then requeues the job, which resumes from that checkpoint. On preemption or
`scontrol requeue`, SLURM itself sends SIGTERM to every process (the trainer checkpoints) and requeues.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.commands import LaunchError
from launch.hostfile import Host, check_host

# Values that go into `#SBATCH` lines: one token, no spaces or newlines.
_SBATCH_VALUE = re.compile(r"[\w.,:@%+=/-]+")
# sbatch --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]], or no limit
_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}|unlimited|infinite", re.IGNORECASE)


def time_limit(text: str) -> str:
    """`--time` as sbatch takes it (argparse type): a typo is refused here, not by sbatch on the cluster."""
    if not _TIME.fullmatch(text):
        import argparse

        raise argparse.ArgumentTypeError(f"{text!r} is not a SLURM time limit: use MINUTES, HH:MM:SS or "
                                         "D-HH[:MM[:SS]] (e.g. 24:00:00 or 2-00:00:00)")
    return text


def _scontrol(*args: str) -> str:
    r = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise LaunchError(f"scontrol {' '.join(args)} failed: {r.stderr.strip()}")
    return r.stdout


def allocation_hosts(nproc_per_node: int) -> list[Host]:
    """The nodes of the current allocation, in SLURM's order."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("--launcher slurm runs inside an allocation (sbatch/salloc): SLURM_JOB_NODELIST is not "
                          "set; use 'python -m launch sbatch' to submit a job instead")
    return [Host(check_host(n), nproc_per_node) for n in _scontrol("show", "hostnames", nodelist).split()]


def master_addr() -> str:
    """MASTER_ADDR if set, else the address of the first node of SLURM_JOB_NODELIST (its NodeAddr)."""
    if os.environ.get("MASTER_ADDR"):
        return check_host(os.environ["MASTER_ADDR"])
    from runtime.dist import first_host

    name = first_host(os.environ["SLURM_JOB_NODELIST"])
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", name))
    return check_host(m[1] if m else name)


def gpus_on_node() -> int:
    """GPUs SLURM gave this node (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE like 'a100:8'), else 0."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        m = re.search(r"(\d+)$", os.environ.get(name, ""))
        if m:
            return int(m[1])
    return 0


def srun_argv(nodes: int, nproc: int, master: str, port: int, job_argv: list[str]) -> list[str]:
    """srun with one `launch node --slurm-torchrun` task per node; `--label` prefixes lines with the node."""
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            "--label", "--unbuffered", sys.executable, "-u", "-m", "launch", "node", "--slurm-torchrun",
            f"--nproc-per-node={nproc}", f"--master-addr={master}", f"--master-port={port}", "--", *job_argv]


def requeue_self() -> None:
    """Put this job back in the queue (after the ranks checkpointed on SIGUSR1)."""
    _scontrol("requeue", os.environ["SLURM_JOB_ID"])


@dataclass
class SbatchSpec:
    """What `python -m launch sbatch` writes into the batch script."""

    nodes: int
    job: list[str]
    run_dir: Path
    gpus_per_node: int = 8
    nproc_per_node: int | None = None  # default: gpus_per_node (1 on a CPU partition)
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str = "vitscale"
    cpus_per_task: int | None = None
    master_port: int = 29500
    requeue: bool = True
    signal_grace_s: int = 300
    grace_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)  # more `#SBATCH` options, e.g. --qos=high


def _directive(opt: str, value: object) -> str:
    text = str(value)
    if not _SBATCH_VALUE.fullmatch(text):
        raise LaunchError(f"sbatch option {opt} value {text!r} has spaces or shell characters; use a plain token")
    return f"#SBATCH {opt}={text}"


def sbatch_script(spec: SbatchSpec, cwd: str | None = None) -> str:
    """The batch script text (every value quoted or checked; see the module doc)."""
    run_dir = Path(cwd or os.getcwd()) / spec.run_dir
    if not _SBATCH_VALUE.fullmatch(str(run_dir)):  # sbatch reads `#SBATCH` lines without a shell: no quoting there
        raise LaunchError(f"--run-dir {str(run_dir)!r} has spaces or shell characters, which the script's "
                          "`#SBATCH --output` line cannot hold; use a run dir (and working directory) without them")
    nproc = spec.nproc_per_node or spec.gpus_per_node or 1
    lines = ["#!/bin/bash", "# Written by `python -m launch sbatch`: submit with `sbatch` this file.",
             _directive("--job-name", spec.job_name), _directive("--nodes", spec.nodes),
             _directive("--ntasks-per-node", 1), _directive("--output", run_dir / "logs" / "slurm-%j.out"),
             "#SBATCH --open-mode=append"]
    if spec.gpus_per_node:
        lines.append(_directive("--gpus-per-node", spec.gpus_per_node))
    for opt, value in (("--cpus-per-task", spec.cpus_per_task), ("--time", spec.time),
                       ("--partition", spec.partition), ("--account", spec.account)):
        if value:
            lines.append(_directive(opt, value))
    if spec.requeue:
        lines += ["#SBATCH --requeue", _directive("--signal", f"B:USR1@{spec.signal_grace_s}")]
    for opt in spec.extra:
        name, _, value = opt.partition("=")
        if not re.fullmatch(r"--[a-z][a-z-]*", name):
            raise LaunchError(f"--sbatch-arg {opt!r}: expected --option=value")
        lines.append(_directive(name, value) if value else f"#SBATCH {name}")
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(cwd or os.getcwd()))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(spec.env.items())]
    launcher = [sys.executable, "-u", "-m", "launch", "run", "--launcher=slurm", f"--run-dir={run_dir}",
                f"--nproc-per-node={nproc}", f"--master-port={spec.master_port}", f"--grace={spec.grace_s:g}"]
    if spec.requeue:
        launcher.append("--requeue-on-usr1")
    lines.append("exec " + shlex.join([*launcher, "--", *spec.job]))
    return "\n".join(lines) + "\n"


def submit(script: Path, wait: bool = False) -> tuple[int, str]:
    """`sbatch [--wait] script`; return (exit code, job id or sbatch's message)."""
    argv = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [str(script)]
    r = subprocess.run(argv, capture_output=True, text=True)
    job_id = r.stdout.strip().split(";")[0] if r.stdout.strip() else ""
    return r.returncode, job_id or r.stderr.strip()
