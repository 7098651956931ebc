"""`python -m launch VERB`: start vitscale jobs on one or many nodes.

  run                 launch a job: python -m launch run --hostfile H [--launcher torchrun] -- python -m MOD ...
  check               preflight only (reachability, master port, versions, GPUs, shards, batch) [-- JOB]
  sbatch              write (and with --submit, submit) a SLURM batch script
  accelerate-config   write an `accelerate launch` config for the hostfile and print per-node commands
  probe, node, exec   run on the nodes by the verbs above (report facts, supervise a node, run a payload)

A job `python -m pretrain|finetune train RECIPE k=v ...` has its recipe loaded first (launch/jobcheck.py): a
recipe the stage would refuse is its one-line error here, exit 2, before anything is written or started; its
dataset, workers and batch sizes feed preflight. Any other command after `--` is passed through unchecked.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from launch import slurm
from launch.commands import Job, LaunchError, Plan, parse_env, parse_job, propagated_env, torchrun_static
from launch.hostfile import Host, HostfileError, check_host, format_hosts, read_hostfile
from launch.jobcheck import JobFacts, job_facts, load_job_config
from launch.launchers import LAUNCHERS, build_runs
from launch.node import exec_payload, run_node
from launch.runner import run_all
from runtime.argtypes import count, index, port, seconds

# torch (via preflight and runtime) is imported only by the verbs that need it: `node` and `exec` run once
# per node and per rank, and should start in a fraction of a second.


def _hosts_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hostfile", help="DeepSpeed-style hostfile: one 'HOST slots=N' per line")
    p.add_argument("--include", default="", help="only these hosts (comma or @ separated)")
    p.add_argument("--exclude", default="", help="all hosts but these")
    p.add_argument("--nproc-per-node", type=count, help="processes per node (default: the hostfile's slots)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    p.add_argument("--master-addr", help="rendezvous host (default: the first host)")
    p.add_argument("--master-port", type=port, default=29500)
    p.add_argument("--ssh-config", help="ssh client config file (passed as ssh -F; also to pdsh)")
    p.add_argument("--ssh-port", type=port, help="ssh port of the nodes")


def _job_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job facts checked by preflight (default: from the recipe of a `python -m "
                             "pretrain|finetune train` job; a flag overrides it)")
    g.add_argument("--dataset", help="dataset.json (or its folder): shards >= nodes x GPUs x workers")
    g.add_argument("--split", help="the split trained on (default data.train_split, else train)")
    g.add_argument("--workers", type=index, help="DataLoader workers per rank (default data.workers, else 1)")
    g.add_argument("--global-batch", type=count, help="must divide by micro-batch x world size")
    g.add_argument("--micro-batch", type=count)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)
    r = sub.add_parser("run", help="launch a job (command after --)")
    _hosts_args(r)
    _job_args(r)
    r.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set on every node")
    r.add_argument("--run-dir", help="logs/node-{i}.log and the hostfile go here (default runs/launch-TIME)")
    r.add_argument("--node-rank", type=index, help="start only this node's command (nossh/ssh/torchrun)")
    r.add_argument("--grace", type=seconds, default=300.0,
                   help="after a node fails, seconds the others get to stop on their own (>= dist timeout)")
    r.add_argument("--no-check", action="store_true", help="skip preflight")
    r.add_argument("--dry-run", action="store_true", help="print each node's command, run nothing")
    r.add_argument("--requeue-on-usr1", action="store_true", help="slurm: requeue the job after SIGUSR1")
    c = sub.add_parser("check", help="preflight checks only")
    _hosts_args(c)
    _job_args(c)
    s = sub.add_parser("sbatch", help="write a SLURM batch script (command after --)")
    s.add_argument("--nodes", type=count, required=True)
    s.add_argument("--gpus-per-node", type=index, default=8, help="0 on a CPU partition")
    s.add_argument("--nproc-per-node", type=count, help="default: GPUs per node (1 without GPUs)")
    s.add_argument("--time", type=slurm.time_limit, help="the job's time limit (sbatch --time)")
    for opt in ("--partition", "--account"):
        s.add_argument(opt)
    s.add_argument("--job-name", default="vitscale")
    s.add_argument("--cpus-per-task", type=count)
    s.add_argument("--run-dir", required=True)
    s.add_argument("--master-port", type=port, default=29500)
    s.add_argument("--no-requeue", action="store_true", help="no --requeue / SIGUSR1 checkpoint-and-requeue")
    s.add_argument("--signal-grace", type=index, default=300, help="SIGUSR1 this many seconds before the limit")
    s.add_argument("--grace", type=seconds, default=300.0)
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPT=VALUE", help="extra #SBATCH line")
    s.add_argument("--no-check", action="store_true", help="skip the dataset and batch checks")
    _job_args(s)
    s.add_argument("--submit", action="store_true", help="submit with sbatch")
    s.add_argument("--wait", action="store_true", help="with --submit: wait for the job, return its exit code")
    a = sub.add_parser("accelerate-config", help="accelerate launch config + per-node commands")
    _hosts_args(a)
    a.add_argument("--out", required=True, help="config YAML to write")
    a.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    a.add_argument("--cpu", action="store_true", help="CPU nodes (tests)")
    pr = sub.add_parser("probe", help="print this node's facts as JSON")
    pr.add_argument("--port", type=port)
    pr.add_argument("--port-addr")
    n = sub.add_parser("node", help="supervise this node's command (command after --)")
    n.add_argument("--watch-stdin", action="store_true")
    n.add_argument("--log")
    n.add_argument("--slurm-torchrun", action="store_true", help="build torchrun from SLURM_* (under srun)")
    n.add_argument("--nproc-per-node", type=count, default=1)
    n.add_argument("--master-addr")
    n.add_argument("--master-port", type=port, default=29500)
    e = sub.add_parser("exec", help="run a job payload (DeepSpeed/pdsh path)")
    e.add_argument("payload")
    return p


def _hosts(args: argparse.Namespace) -> list[Host]:
    if args.launcher == "slurm":
        return slurm.allocation_hosts(args.nproc_per_node or slurm.gpus_on_node() or 1)
    if args.launcher == "local" and not args.hostfile:
        return [Host("localhost", args.nproc_per_node or 1)]
    if not args.hostfile:
        raise HostfileError(f"--launcher {args.launcher} needs --hostfile (one 'HOST slots=N' line per node)")
    hosts = read_hostfile(args.hostfile, args.include, args.exclude)
    if args.launcher == "local" and len(hosts) > 1:
        raise HostfileError(f"--launcher local runs on this machine only; the hostfile lists {len(hosts)} hosts")
    return [Host(h.name, args.nproc_per_node) for h in hosts] if args.nproc_per_node else hosts


def _master(args: argparse.Namespace, hosts: list[Host]) -> str:
    if args.master_addr:
        return check_host(args.master_addr)
    return slurm.master_addr() if args.launcher == "slurm" else hosts[0].name


def _job(args: argparse.Namespace, job_argv: list[str], required: bool = True) -> tuple[Job | None, JobFacts]:
    """The job after `--` (its recipe loaded when it is a vitscale training command) and the facts to check."""
    if not job_argv and not required:
        return None, job_facts(None, args)
    job = parse_job(job_argv)
    return job, job_facts(load_job_config(job), args)


def _report(fails: list[str], notes: list[str], summary: str, facts: JobFacts) -> bool:
    """Print preflight's lines (notes, one line per failure, or the summary with each fact's source)."""
    for line in notes:
        print(f"preflight: note: {line}", flush=True)
    for line in fails:
        print(f"preflight: FAIL {line}", flush=True)
    checked = f"; {facts.describe()}" if facts.describe() else ""
    print(f"preflight: {'failed' if fails else 'ok'} ({summary}){checked}", flush=True)
    return not fails


def _preflight(args: argparse.Namespace, hosts: list[Host], master: str, facts: JobFacts) -> bool:
    """Run the checks, print one line per failure; True if the job may start."""
    from launch import preflight

    via = {"pdsh": "all", "torchrun": "remote", "ssh": "remote", "slurm": "srun"}.get(args.launcher, "none")
    probes = preflight.probe_hosts(hosts, master, args.master_port, via, args.ssh_config, args.ssh_port)
    fails, notes = preflight.evaluate(hosts, probes, master, args.master_port, facts)
    n, procs = len(hosts), sum(h.slots for h in hosts)
    return _report(fails, notes, f"{n} node{'s' * (n != 1)}, {procs} process{'es' * (procs != 1)}", facts)


def cmd_run(args: argparse.Namespace, job_argv: list[str]) -> int:
    job, facts = _job(args, job_argv)  # a recipe the job would refuse stops here, before anything is written
    hosts = _hosts(args)
    master = _master(args, hosts)
    run_dir = Path(args.run_dir or time.strftime("runs/launch-%Y%m%d-%H%M%S"))
    plan = Plan(hosts, job, master, args.master_port, propagated_env(parse_env(args.env)), run_dir,
                run_id=run_dir.name or "vitscale")
    runs = build_runs(plan, args.launcher, args.ssh_config, args.ssh_port, args.node_rank,
                      slurm_nproc=hosts[0].slots, dry_run=args.dry_run)
    if not args.dry_run and not args.no_check and not _preflight(args, hosts, master, facts):
        print("launch: preflight failed; nothing was started (fix the lines above, or --no-check)", flush=True)
        return 2
    if args.launcher in ("pdsh", "ssh", "nossh"):  # DeepSpeed's launcher reads it on every node (shared FS)
        from runtime.io import atomic_write

        atomic_write(plan.hostfile, format_hosts(hosts))
    if args.dry_run:
        for r in runs:
            print(f"# {r.label}\n{shlex.join(r.shown or r.argv)}")
        return 0
    requeue = []
    if args.launcher == "slurm" and args.requeue_on_usr1:
        def on_usr1(_signum, _frame):  # SLURM's warning before the time limit: ranks checkpoint, then requeue
            requeue.append(True)
            for r in runs:
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.send_signal(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, on_usr1)
    code = run_all(runs, run_dir / "logs", [h.name for h in hosts], args.grace)
    if requeue:
        print(f"launch: SIGUSR1 received; requeueing SLURM job {os.environ['SLURM_JOB_ID']}", flush=True)
        slurm.requeue_self()
    return code


def cmd_check(args: argparse.Namespace, job_argv: list[str]) -> int:
    _, facts = _job(args, job_argv, required=False)
    hosts = _hosts(args)
    return 0 if _preflight(args, hosts, _master(args, hosts), facts) else 1


def cmd_sbatch(args: argparse.Namespace, job_argv: list[str]) -> int:
    from runtime.io import atomic_write

    _, facts = _job(args, job_argv)  # fail now, not on the cluster
    nproc = args.nproc_per_node or args.gpus_per_node or 1
    spec = slurm.SbatchSpec(
        nodes=args.nodes, job=job_argv, run_dir=Path(args.run_dir), gpus_per_node=args.gpus_per_node,
        nproc_per_node=args.nproc_per_node, time=args.time, partition=args.partition, account=args.account,
        job_name=args.job_name, cpus_per_task=args.cpus_per_task, master_port=args.master_port,
        requeue=not args.no_requeue, signal_grace_s=args.signal_grace, grace_s=args.grace,
        env=propagated_env(parse_env(args.env)), extra=args.sbatch_arg)
    text = slurm.sbatch_script(spec)  # every option checked before preflight says "ok"
    if facts.describe() and not args.no_check:  # the dataset as this (login) node sees the shared filesystem
        from launch.preflight import job_checks

        fails, notes = job_checks(args.nodes, args.nodes * nproc, facts)
        if not _report(fails, notes, f"{args.nodes} nodes x {nproc} processes", facts):
            print("launch: preflight failed; no batch script was written (fix the lines above, or --no-check)",
                  flush=True)
            return 2
    script = Path(args.run_dir) / "sbatch.sh"
    atomic_write(script, text)
    (Path(args.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    print(f"launch: wrote {script}", flush=True)
    if not args.submit:
        print(f"submit with: sbatch {shlex.quote(str(script))}")
        return 0
    code, job_id = slurm.submit(script, wait=args.wait)
    print(f"launch: sbatch exit {code}: job {job_id}" if job_id.isdigit() else f"launch: sbatch failed: {job_id}",
          flush=True)
    return code


def cmd_accelerate(args: argparse.Namespace, job_argv: list[str]) -> int:
    from launch import accel

    job = _job(args, job_argv)[0] if job_argv else None
    hosts = _hosts(args)
    cfg = accel.accelerate_config(hosts, _master(args, hosts), args.master_port, args.mixed_precision,
                                  gpus=not args.cpu)
    path = accel.write_config(args.out, cfg)
    print(f"launch: wrote {path}")
    if job is not None:
        print(accel.format_commands(accel.accelerate_commands(path, hosts, job), hosts), end="")
    return 0


def cmd_node(args: argparse.Namespace, job_argv: list[str]) -> int:
    if args.slurm_torchrun:
        env = os.environ
        job_argv = torchrun_static(int(env["SLURM_NNODES"]), int(env["SLURM_NODEID"]), args.nproc_per_node,
                                   args.master_addr or slurm.master_addr(), args.master_port, parse_job(job_argv))
    return run_node(job_argv, log=args.log, watch_stdin=args.watch_stdin)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job_argv = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    try:
        if args.verb == "run":
            return cmd_run(args, job_argv)
        if args.verb == "check":
            return cmd_check(args, job_argv)
        if args.verb == "sbatch":
            return cmd_sbatch(args, job_argv)
        if args.verb == "accelerate-config":
            return cmd_accelerate(args, job_argv)
        if args.verb == "probe":
            from launch import preflight

            print(json.dumps(preflight.probe_info(args.port_addr, args.port)), flush=True)
            return 0
        if args.verb == "node":
            return cmd_node(args, job_argv)
        exec_payload(args.payload)
    except (HostfileError, LaunchError) as e:
        print(f"launch: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
