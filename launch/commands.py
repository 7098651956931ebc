"""Per-node commands for every way of starting a job: torchrun, DeepSpeed (pdsh or `--no_ssh`), srun, ssh.

Commands are argument lists end to end. Where a remote shell is unavoidable (ssh, pdsh), the line it sees
is either `shlex.join` of an argument list or fixed text plus a base64 payload: a host, argument or
environment value containing shell syntax reaches the job as data and never runs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launch.hostfile import Host

# Variables copied from the launching shell to every node, by exact name or prefix.
PROPAGATE_NAMES = ("PYTHONPATH", "OMP_NUM_THREADS", "VIRTUAL_ENV", "PYTHONUNBUFFERED")
PROPAGATE_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "UCX_", "FI_", "DS_")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What DeepSpeed's pdsh runner pastes unquoted into the remote shell line (paths, addresses) must match this.
_SHELL_SAFE = re.compile(r"[\w@%+=:,./-]+")


class LaunchError(ValueError):
    """A launch that cannot start as asked, with the reason and the fix."""


@dataclass(frozen=True)
class Job:
    """The job command, split into how a Python launcher takes it: a module, a script or a program."""

    kind: str  # module | script | program
    target: str
    args: tuple[str, ...] = ()

    def argv(self, python: str = sys.executable) -> list[str]:
        """The command as run directly, with this interpreter for Python jobs."""
        if self.kind == "module":
            return [python, "-u", "-m", self.target, *self.args]
        if self.kind == "script":
            return [python, "-u", self.target, *self.args]
        return [self.target, *self.args]

    def torchrun_args(self) -> list[str]:
        lead = {"module": ["-m"], "script": [], "program": ["--no-python"]}[self.kind]
        return [*lead, self.target, *self.args]

    def deepspeed_args(self) -> list[str]:
        # `--no_local_rank`: our jobs read LOCAL_RANK from the environment like under torchrun.
        lead = {"module": ["--module"], "script": [], "program": ["--no_python"]}[self.kind]
        return ["--no_local_rank", *lead, self.target, *self.args]


def parse_job(argv: list[str]) -> Job:
    """Split `python -m mod args` / `python script.py args` / `program args` into a Job."""
    if not argv:
        raise LaunchError("no job command given; put it after '--', e.g. -- python -m pretrain train debug_cpu")
    first, rest = argv[0], list(argv[1:])
    if not (re.fullmatch(r"python[0-9.]*", Path(first).name) or first == sys.executable):
        return Job("program", first, tuple(rest))
    while rest and rest[0] == "-u":  # unbuffered is always on (PYTHONUNBUFFERED=1)
        rest.pop(0)
    if rest[:1] == ["-m"] and len(rest) > 1:
        return Job("module", rest[1], tuple(rest[2:]))
    if rest and not rest[0].startswith("-"):
        return Job("script", rest[0], tuple(rest[1:]))
    raise LaunchError(f"cannot launch {shlex.join(argv)!r}: use 'python -m MODULE ...' or 'python SCRIPT ...' "
                      "(interpreter options other than -u are not passed through launchers)")


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`NAME=VALUE` strings (from --env) to a dict; a bad name is an error naming it."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.fullmatch(name):
            raise LaunchError(f"--env {pair!r}: expected NAME=VALUE with NAME made of letters, digits and '_'")
        out[name] = value
    return out


def propagated_env(extra: dict[str, str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every node gets: the venv, PYTHONPATH, NCCL_*/GLOO_*/OMP_NUM_THREADS..., then --env."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k in PROPAGATE_NAMES or k.startswith(PROPAGATE_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"  # prefixed console lines arrive as they are printed
    env.update(extra)
    return env


@dataclass
class Plan:
    """Everything needed to build the per-node commands of one job."""

    hosts: list[Host]
    job: Job
    master_addr: str
    master_port: int
    env: dict[str, str] = field(default_factory=dict)
    run_dir: Path = Path("runs/launch")
    run_id: str = "vitscale"
    cwd: str = field(default_factory=os.getcwd)

    @property
    def world_size(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def hostfile(self) -> Path:
        """The validated, filtered hostfile written into the run dir (read by DeepSpeed's launcher)."""
        return (Path(self.cwd) / self.run_dir / "hostfile").resolve()

    def rank_range(self, node: int) -> tuple[int, int]:
        """First and last global rank that node `node` runs under a static rank layout."""
        first = sum(h.slots for h in self.hosts[:node])
        return first, first + self.hosts[node].slots - 1


def torchrun_node(plan: Plan, node: int) -> list[str]:
    """torchrun on node `node` with the c10d rendezvous hosted at the master address."""
    host = plan.hosts[node]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(plan.hosts)}",
           f"--nproc-per-node={host.slots}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={plan.master_addr}:{plan.master_port}", f"--rdzv-id={plan.run_id}",
           f"--local-addr={host.name}", "--max-restarts=0"]
    if plan.master_addr == plan.hosts[0].name:  # say who hosts the store instead of guessing from hostnames
        cmd.append(f"--rdzv-conf=is_host={int(node == 0)}")
    return cmd + plan.job.torchrun_args()


def torchrun_static(nnodes: int, node_rank: int, nproc: int, master_addr: str, master_port: int,
                    job: Job) -> list[str]:
    """torchrun with a fixed node rank (used under srun, where SLURM_NODEID is authoritative)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node-rank={node_rank}",
            f"--nproc-per-node={nproc}", f"--master-addr={master_addr}", f"--master-port={master_port}",
            "--max-restarts=0", *job.torchrun_args()]


def deepspeed_nossh_node(plan: Plan, node: int) -> list[str]:
    """DeepSpeed's launcher for one node without ssh (`--no_ssh --node_rank`); reads the run-dir hostfile."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={plan.hostfile}", "--no_ssh",
            f"--node_rank={node}", f"--master_addr={plan.master_addr}", f"--master_port={plan.master_port}",
            *plan.job.deepspeed_args()]


def encode_payload(argv: list[str], env: dict[str, str], cwd: str) -> str:
    """The job as URL-safe base64 JSON: only [A-Za-z0-9_=-] crosses a remote shell."""
    return base64.urlsafe_b64encode(json.dumps({"argv": argv, "env": env, "cwd": cwd}).encode()).decode()


def decode_payload(text: str) -> dict:
    """Inverse of encode_payload."""
    return json.loads(base64.urlsafe_b64decode(text.encode()))


def deepspeed_pdsh(plan: Plan, ssh_port: int | None = None) -> list[str]:
    """DeepSpeed's own multi-node launcher over pdsh/ssh; the job travels as a payload to `launch exec`."""
    for what, value in (("working directory", plan.cwd), ("python", sys.executable), ("hostfile", str(plan.hostfile)),
                        ("master address", plan.master_addr)):
        if not _SHELL_SAFE.fullmatch(value):
            raise LaunchError(f"{what} {value!r} has characters DeepSpeed's pdsh runner would hand to a shell "
                              "unquoted; move it to a path of letters, digits and ./_-, or use --launcher torchrun")
    payload = encode_payload(plan.job.argv(), plan.env, plan.cwd)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={plan.hostfile}", "--launcher=pdsh",
           f"--master_addr={plan.master_addr}", f"--master_port={plan.master_port}", "--no_ssh_check",
           "--force_multi"]  # pdsh even for one host, never a silent local run
    if ssh_port:
        cmd.append(f"--ssh_port={ssh_port}")
    return cmd + ["--no_local_rank", "--module", "launch", "exec", payload]


def node_wrapper(argv: list[str], env: dict[str, str], cwd: str, supervise: bool = True,
                 log: str | None = None) -> list[str]:
    """`argv` with this cwd and env, under `launch node` (venv on PATH, stops when the launcher goes away).

    With supervise=False: the plain command to paste on a node by hand. `log`: the node also keeps its own
    copy of its output and exit code there (what the launcher cannot see once the node is unreachable).
    """
    assigns = [f"{k}={v}" for k, v in sorted(env.items())]
    logs = ["--log", log] if log else []
    wrap = [sys.executable, "-m", "launch", "node", "--watch-stdin", *logs, "--"] if supervise else []
    return ["env", f"--chdir={cwd}", *assigns, *wrap, *argv]


# A node that drops off the network leaves its ssh session idle, not closed: without keepalives the launcher's
# ssh would wait forever. With them, ssh exits 255 ("connection lost") after 3 unanswered probes 5 s apart.
SSH_ALIVE = ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]


def ssh_argv(host: str, remote: list[str], ssh_config: str | None = None, ssh_port: int | None = None,
             connect_timeout: int = 10) -> list[str]:
    """ssh to `host` running the argument list `remote`, quoted as one shell-safe line."""
    opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}", *SSH_ALIVE]
    if ssh_config:
        opts += ["-F", ssh_config]
    if ssh_port:
        opts += ["-p", str(ssh_port)]
    return ["ssh", *opts, host, "--", shlex.join(remote)]


def pdsh_ssh_args(ssh_config: str | None) -> str:
    """PDSH_SSH_ARGS_APPEND for pdsh's ssh module (non-interactive, our ssh config)."""
    parts = ["-o", "BatchMode=yes", *SSH_ALIVE] + (["-F", ssh_config] if ssh_config else [])
    return shlex.join(parts)
