"""Preflight: before a job starts, check every node the way the job will use it. Each failure is one line.

Checked: every host answers (over ssh when the launcher uses ssh), the master port is free on the master
node, vitscale (version and a fingerprint of its code), torch and deepspeed are the same everywhere, each
node has at least as many GPUs as slots (or no node has any: a CPU run), the dataset exists and has enough
shards for nodes x GPUs x workers, and the global batch divides by micro-batch x world size. The job's facts
(dataset, split, workers, batch sizes) come from its recipe or from flags (launch/jobcheck.py); `job_checks`
is also what `sbatch` runs before it writes a script.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from launch.commands import ssh_argv
from launch.hostfile import Host, is_local
from launch.jobcheck import JobFacts

PACKAGES = ("vit", "runtime", "data_prep", "pretrain", "finetune", "launch")
PROBE_TIMEOUT_S = 60


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 (12 hex) of vitscale's Python sources: two nodes with different code differ here."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def port_free(addr: str, port: int) -> bool:
    """True if nothing listens on addr:port here (we can bind it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((addr, port))
            return True
        except OSError:
            return False


def gpu_count() -> int:
    """GPUs torch sees here; 0 without importing torch (seconds) when the node has no NVIDIA device files."""
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def probe_info(port_addr: str | None = None, port: int | None = None) -> dict:
    """What this node reports to preflight (also `python -m launch probe`)."""
    info = {
        "hostname": socket.gethostname(),
        "python": sys.executable,
        "vitscale": _version("vitscale"),
        "code": code_fingerprint(),
        "torch": _version("torch"),
        "deepspeed": _version("deepspeed"),
        "gpus": gpu_count(),
    }
    if port is not None and is_local(port_addr or "127.0.0.1"):  # only the master node can answer this
        info["port_free"] = port_free(port_addr or "0.0.0.0", port)
    return info


@dataclass
class Probe:
    host: str
    info: dict | None = None
    error: str | None = None


def probe_remote(host: str, port_args: list[str], ssh_config: str | None, ssh_port: int | None) -> Probe:
    """Run `python -m launch probe` on `host` over ssh."""
    remote = ["env", f"--chdir={Path.cwd()}", sys.executable, "-m", "launch", "probe", *port_args]
    argv = ssh_argv(host, remote, ssh_config, ssh_port, connect_timeout=10)
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return Probe(host, error=f"no answer over ssh within {PROBE_TIMEOUT_S}s")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        return Probe(host, error=f"unreachable over ssh ({why})")
    return Probe(host, info=json.loads(lines[-1]))


def probe_hosts(hosts: list[Host], master: str, port: int, via_ssh: str, ssh_config: str | None = None,
                ssh_port: int | None = None) -> list[Probe]:
    """Probe every host: `via_ssh` is 'all' (pdsh), 'remote' (local hosts in-process), 'srun' or 'none'."""
    port_args = ["--port", str(port), "--port-addr", master]
    if via_ssh == "srun":
        return probe_srun(hosts, port_args)

    def one(h: Host) -> Probe:
        local = is_local(h.name)
        if via_ssh == "all" or (via_ssh == "remote" and not local):
            return probe_remote(h.name, port_args, ssh_config, ssh_port)
        if local:
            return Probe(h.name, info=probe_info(master, port))
        return Probe(h.name, error="not this machine and the launcher has no ssh: run "
                                   "'python -m launch probe' there to check it")

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:  # all nodes at once, not one by one
        return list(pool.map(one, hosts))


def probe_srun(hosts: list[Host], port_args: list[str]) -> list[Probe]:
    """Inside a SLURM allocation: one probe task per node with srun (`--label` says which node answered)."""
    argv = ["srun", f"--nodes={len(hosts)}", f"--ntasks={len(hosts)}", "--ntasks-per-node=1", "--label",
            sys.executable, "-m", "launch", "probe", *port_args]
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [Probe(h.name, error=f"srun probe gave no answer within {PROBE_TIMEOUT_S}s") for h in hosts]
    answers = {}
    for line in r.stdout.splitlines():
        task, _, text = line.partition(": ")
        if task.strip().isdigit() and text.startswith("{"):
            answers[int(task)] = json.loads(text)
    why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
    return [Probe(h.name, info=answers[i]) if i in answers else Probe(h.name, error=f"srun probe failed ({why})")
            for i, h in enumerate(hosts)]


def dataset_shards(path: str, split: str) -> int:
    """Number of shards of `split` in a dataset.json (or the folder holding it)."""
    p = Path(path)
    p = p / "dataset.json" if p.is_dir() else p
    meta = json.loads(p.read_text())
    if split not in meta.get("splits", {}):
        raise ValueError(f"dataset {p} has no split {split!r} (splits: {', '.join(meta.get('splits', {}))})")
    return len(meta["splits"][split]["shards"])


def dataset_check(nodes: int, world: int, facts: JobFacts) -> tuple[list[str], list[str]]:
    """The dataset against the world it will feed: it exists, has the split, and (unless data.resampled) has a
    shard for every reader, nodes x GPUs x workers. Returns (failures, notes)."""
    from trainer.config import is_local

    path, where = str(facts.dataset.value), facts.dataset.source
    split, workers = facts.value("split", "train"), max(1, facts.value("workers", 0))
    p = Path(path)
    if is_local(path) and not (p / "dataset.json" if p.is_dir() else p).exists():
        return [f"dataset {path} ({where}) does not exist; write shards with `python -m data_prep write SRC OUT` "
                "and pass OUT/dataset.json"], []
    if not is_local(path) or not (p.is_dir() or p.suffix == ".json"):  # URLs, patterns, tar paths
        return [], [f"dataset {path} ({where}) is not a dataset.json: its shards are checked by the job itself"]
    try:
        shards = dataset_shards(path, split)
    except (OSError, ValueError) as e:
        return [f"dataset {path} ({where}): {e}"], []
    need = world * workers
    if shards >= need or facts.value("resampled", False):
        return [], []
    return [f"dataset {path} ({where}) has {shards} {split} shards, fewer than nodes x GPUs x workers = "
            f"{nodes} x {world // nodes} x {workers} = {need}; write more shards or set data.resampled=true"], []


def job_checks(nodes: int, world: int, facts: JobFacts) -> tuple[list[str], list[str]]:
    """The job's own facts (dataset, batch sizes) against `nodes` nodes running `world` ranks in all."""
    from runtime.dist import accumulation_steps

    fails, notes = [], []
    if facts.value("dataset"):
        fails, notes = dataset_check(nodes, world, facts)
    if (global_batch := facts.value("global_batch")) is not None:
        try:
            accumulation_steps(global_batch, facts.value("micro_batch") or 1, world)
        except ValueError as e:
            fails.append(str(e))
    return fails, notes


def evaluate(hosts: list[Host], probes: list[Probe], master: str, port: int,
             facts: JobFacts | None = None) -> tuple[list[str], list[str]]:
    """Turn probes and job facts into (failures, notes): one line each."""
    fails, notes = [], []
    ok = [p for p in probes if p.info]
    fails += [f"host {p.host}: {p.error}" for p in probes if p.error]
    for p in ok:
        if p.info.get("port_free") is False:
            fails.append(f"master port {port} on {master} is already in use; pick a free one with --master-port")
    for key in ("vitscale", "code", "torch", "deepspeed", "python"):
        seen = {p.info[key] for p in ok}
        if len(seen) > 1:
            fails.append(f"{key} differs across nodes: " + ", ".join(f"{p.host}={p.info[key]}" for p in ok))
    slots = {h.name: h.slots for h in hosts}
    if any(p.info["gpus"] for p in ok):
        for p in ok:
            if p.info["gpus"] < slots[p.host]:
                fails.append(f"host {p.host} has {p.info['gpus']} GPUs but slots={slots[p.host]}; "
                             "lower its slots or fix the node")
    elif ok:
        notes.append("no GPU on any node: ranks run on CPU with gloo")
    job_fails, job_notes = job_checks(len(hosts), sum(slots.values()), facts or JobFacts())
    return fails + job_fails, notes + job_notes
