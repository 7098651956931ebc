"""From a Plan to the processes the launching host starts, for each launcher.

| launcher | what runs                                                                            |
|----------|--------------------------------------------------------------------------------------|
| torchrun | torchrun (c10d rendezvous) on every node: here for this machine, over ssh for others  |
| pdsh     | DeepSpeed's launcher, which reaches every node with pdsh over ssh                      |
| ssh      | DeepSpeed `--no_ssh --node_rank=i` on every node, started by this launcher over ssh    |
| nossh    | the same per-node commands, never over ssh: this machine's nodes (or `--node-rank`)   |
| slurm    | srun, one task per node, each starting torchrun (inside an allocation)                |
| local    | torchrun --standalone on this machine                                                  |
"""

from __future__ import annotations

import sys

from launch.commands import (
    LaunchError,
    Plan,
    deepspeed_nossh_node,
    deepspeed_pdsh,
    node_wrapper,
    pdsh_ssh_args,
    ssh_argv,
    torchrun_node,
)
from launch.hostfile import is_local
from launch.runner import NodeRun, scrubbed_env
from launch.slurm import srun_argv

LAUNCHERS = ("torchrun", "pdsh", "ssh", "nossh", "slurm", "local")
# DeepSpeed's pdsh runner re-exports variables with these prefixes into a remote shell line; the job's
# environment travels in the payload instead, so they are kept out of the runner's environment.
_DS_EXPORTED = ("PYTHON", "MLFLOW", "MV2", "UCX", "NCCL")


def _per_node(plan: Plan, argv_of, remote_ok: bool, ssh_config: str | None, ssh_port: int | None,
              only: int | None, dry_run: bool = False) -> list[NodeRun]:
    runs = []
    static = argv_of is not torchrun_node  # c10d hands out ranks at rendezvous; the others go by node order
    for i, host in enumerate(plan.hosts):
        if only is not None and i != only:
            continue
        first, last = plan.rank_range(i)
        ranks = f"ranks {first}-{last}" if static else f"{host.slots} processes"
        label = f"node {i} ({host.name}, {ranks})"
        wrapped = node_wrapper(argv_of(plan, i), plan.env, plan.cwd)
        shown = node_wrapper(argv_of(plan, i), plan.env, plan.cwd, supervise=False)
        if dry_run or only is not None or is_local(host.name):  # dry run: each node's command, to start elsewhere
            runs.append(NodeRun(label, wrapped, shown=shown))
        elif remote_ok:
            own_log = str(plan.run_dir / "logs" / f"node-{i}.on-node.log")  # survives a lost connection
            wrapped = node_wrapper(argv_of(plan, i), plan.env, plan.cwd, log=own_log)
            runs.append(NodeRun(label, ssh_argv(host.name, wrapped, ssh_config, ssh_port), shown=shown))
        else:
            raise LaunchError(f"host {host.name} is not this machine and --launcher nossh never uses ssh: run "
                              f"'--node-rank {i}' on that node (see --dry-run), or use --launcher ssh")
    return runs


def build_runs(plan: Plan, launcher: str, ssh_config: str | None = None, ssh_port: int | None = None,
               node_rank: int | None = None, slurm_nproc: int = 1, dry_run: bool = False) -> list[NodeRun]:
    """The processes to start for `launcher` (see the module table). `dry_run`: only to be printed, so every
    node of the per-node launchers gets its own command, reachable from here or not."""
    if node_rank is not None and launcher not in ("torchrun", "ssh", "nossh"):
        raise LaunchError(f"--node-rank is for the per-node launchers (torchrun, ssh, nossh); --launcher {launcher} "
                          "starts every node itself: drop --node-rank")
    if node_rank is not None and not 0 <= node_rank < len(plan.hosts):
        n = len(plan.hosts)
        raise LaunchError(f"--node-rank {node_rank} is not a node of this job, which has {n}: "
                          + ("node rank 0" if n == 1 else f"node ranks 0-{n - 1}"))
    if launcher == "torchrun":
        return _per_node(plan, torchrun_node, True, ssh_config, ssh_port, node_rank, dry_run)
    if launcher in ("ssh", "nossh"):
        return _per_node(plan, deepspeed_nossh_node, launcher == "ssh", ssh_config, ssh_port, node_rank, dry_run)
    if launcher == "pdsh":
        env = scrubbed_env(_DS_EXPORTED)
        env["PDSH_SSH_ARGS_APPEND"] = pdsh_ssh_args(ssh_config)
        hosts = {h.name: i for i, h in enumerate(plan.hosts)}
        return [NodeRun("deepspeed/pdsh", deepspeed_pdsh(plan, ssh_port), env=env, hosts=hosts, soft_stop=True)]
    if launcher == "slurm":
        argv = srun_argv(len(plan.hosts), slurm_nproc, plan.master_addr, plan.master_port, plan.job.argv())
        return [NodeRun("srun", argv, hosts={str(i): i for i in range(len(plan.hosts))}, soft_stop=True)]
    if launcher == "local":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={plan.hosts[0].slots}", *plan.job.torchrun_args()]
        return [NodeRun(f"node 0 ({plan.hosts[0].name})", node_wrapper(argv, plan.env, plan.cwd))]
    raise LaunchError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
