"""Real hosts for the launch tests, made on this machine and removed afterwards.

- `sshd`: an sshd on 127.0.0.1 and 127.0.0.2 with a host key and a client key made here (no change to ~/.ssh).
- `netns_pair`: two network namespaces joined by a veth pair (10.200.0.1/.2, inside them only), each with its
  own hostname (node1/node2), /etc/hosts and sshd: two hosts that reach each other only over the veth.
- `slurm_cluster`: munged, slurmctld and two slurmd (node1, node2) on loopback, all state in a temp dir.

Daemons are started by the fixtures, stopped by PID at the end. Everything that needs root or a missing
Debian package skips with the reason (`make sysdeps` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, free_port, torch_extensions_dir

# The cheap job of the launcher-mechanics tests (pdsh, --no_ssh, loopback): runtime's 2-process check, which
# prints one JSON line per rank. The runs across real hosts start the trainer itself (`pretrain_job`).
JOB = [sys.executable, "-m", "runtime", "dist-check"]
SSHD = "/usr/sbin/sshd"


def pretrain_job(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    """`python -m pretrain train debug_cpu` (tiny ViT, ZeRO-2 on gloo) on the digits shards, writing to run_dir."""
    return [sys.executable, "-m", "pretrain", "train", "debug_cpu", f"data.path={data}", f"run.dir={run_dir}",
            "eval.every=0", *overrides]


def counted_dataset(root: Path, shards: int = 3) -> str:
    """root/ds/dataset.json listing `shards` train shards and no files: what preflight reads (it counts them)."""
    ds = root / "ds" / "dataset.json"
    ds.parent.mkdir()
    ds.write_text(json.dumps({"splits": {"train": {"shards": [{"name": f"s{i}", "samples": 10}
                                                              for i in range(shards)]}}}))
    return str(ds)


def report(run_dir: Path) -> dict:
    """The trainer's run_dir/report.json (written by rank 0 at the end)."""
    return json.loads((run_dir / "report.json").read_text())


def ds_ops_vars() -> dict[str, str]:
    """The environment under which trainer processes find the project's one DeepSpeed op cache (built by
    `make install`, else once by ds_ops_build_env): TORCH_EXTENSIONS_DIR, and the venv's bin first on PATH
    (launch passes only what it is given to the nodes it starts)."""
    return {"TORCH_EXTENSIONS_DIR": str(torch_extensions_dir()),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def ds_ops_build_env() -> dict[str, str]:
    """Environment for the trainer's runs with DeepSpeed's CPU comm op (JIT-compiled with g++, minutes on a
    loaded machine) built in the project's cache (ds_ops_vars): a load without compiling once `make install`
    built it. A cache is rebuilt whenever a process finds another `ninja` first on PATH (the venv's or the
    system's: they do not read each other's build log), so ranks would compile it again under a test's timeout.
    Built as `launch node` runs the ranks: with the venv's bin first on PATH."""
    env = {**ds_ops_vars(), "OMP_NUM_THREADS": "1"}
    build = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    subprocess.run(["timeout", "-k", "5", "900", sys.executable, "-c", build], cwd=ROOT, env={**os.environ, **env},
                   check=True, capture_output=True, timeout=930)
    return env


def build_ds_ops() -> list[str]:
    """`--env TORCH_EXTENSIONS_DIR=...` for `launch`, with the op built (ds_ops_build_env)."""
    return ["--env", f"TORCH_EXTENSIONS_DIR={ds_ops_build_env()['TORCH_EXTENSIONS_DIR']}"]


@pytest.fixture(scope="session")
def ds_ops_env() -> list[str]:
    """build_ds_ops() once per session."""
    return build_ds_ops()


def need_root(*tools: str) -> None:
    """Skip (with the reason) unless running as root with `tools` installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root (daemons, network namespaces); CI runs the suite as root")
    missing = [t for t in tools if not (Path(t).exists() if t.startswith("/") else shutil.which(t))]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `make sysdeps` (Debian: slurm-wlm munge openssh-server "
                    "openssh-client pdsh iproute2)")


def launch(args: list[str], timeout: float = 120, env: dict | None = None, prefix: list[str] | None = None,
           cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `python -m launch ARGS` (optionally under `prefix`, e.g. `ip netns exec`), bounded by timeout -k."""
    argv = [*(prefix or []), "timeout", "-k", "5", str(int(timeout)), sys.executable, "-m", "launch", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout + 30)


def wait_port(addr: str, port: int, timeout: float = 15, prefix: list[str] | None = None) -> None:
    """Wait until something accepts TCP connections on addr:port (inside a namespace with `prefix`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prefix:
            probe = f"import socket; socket.create_connection(({addr!r}, {port}), 1).close()"
            if subprocess.run([*prefix, sys.executable, "-c", probe], capture_output=True, timeout=20).returncode == 0:
                return
        else:
            try:
                socket.create_connection((addr, port), 1).close()
                return
            except OSError:
                pass
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {addr}:{port} after {timeout}s")


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate daemons we started, by PID; kill them if they linger."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


@dataclass
class Ssh:
    dir: Path
    port: int
    config: Path  # ssh client config: port, key, no host-key prompts


def make_ssh_keys(d: Path, port: int, listen: list[str]) -> Ssh:
    """Host key, client key, authorized_keys, sshd_config and a client config under `d`."""
    d.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    lines = [f"Port {port}", *(f"ListenAddress {a}" for a in listen), f"HostKey {d}/host_key",
             f"AuthorizedKeysFile {d}/authorized_keys", "PermitRootLogin prohibit-password",
             "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no",
             "PrintMotd no", "PidFile none", "MaxStartups 64"]
    (d / "sshd_config").write_text("\n".join(lines) + "\n")
    client = ["Host *", f"  Port {port}", f"  IdentityFile {d}/id_ed25519", "  IdentitiesOnly yes",
              "  StrictHostKeyChecking no", "  UserKnownHostsFile /dev/null", "  LogLevel ERROR", "  BatchMode yes"]
    (d / "ssh_config").write_text("\n".join(client) + "\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    return Ssh(d, port, d / "ssh_config")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """sshd on 127.0.0.1 and 127.0.0.2 (a free port), reachable with the returned client config."""
    need_root(SSHD, "ssh", "pdsh")
    ssh = make_ssh_keys(tmp_path_factory.mktemp("sshd"), free_port(), ["127.0.0.1", "127.0.0.2"])
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(ssh.dir / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(ssh.dir / "sshd.log", "w"))
    try:
        wait_port("127.0.0.2", ssh.port)
        yield ssh
    finally:
        stop([proc])


@dataclass
class NetnsPair:
    names: tuple[str, str]
    addrs: tuple[str, str]
    ssh: Ssh
    sshd: list[subprocess.Popen]
    links: tuple[str, str]  # each host's end of the veth pair (in its namespace)

    def prefix(self, i: int, hostname: str | None = None) -> list[str]:
        """Run a command as host i: inside its namespace, with its own hostname."""
        return ["ip", "netns", "exec", self.names[i], "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                hostname or f"node{i + 1}"]

    def set_link(self, i: int, up: bool) -> None:
        """Take host i's network link down (the node drops off the network, its processes live on) or up.
        Up returns once the other host reaches host i's sshd again: a veth that comes back up needs a moment
        (carrier, neighbour entries) before packets flow, and a connect meanwhile fails "No route to host"."""
        _ip("-n", self.names[i], "link", "set", self.links[i], "up" if up else "down")
        if up:
            wait_port(self.addrs[i], self.ssh.port, timeout=30, prefix=["ip", "netns", "exec", self.names[1 - i]])

    def kill_host(self, i: int) -> int:
        """Kill -9 every process in namespace i (a node dying); return how many."""
        out = subprocess.run(["ip", "netns", "pids", self.names[i]], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split()]
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        return len(pids)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@contextmanager
def make_netns_pair(ssh_dir: Path, suffix: str = "") -> Iterator[NetnsPair]:
    """Two hosts node1 (10.200.0.1) and node2 (10.200.0.2) in network namespaces, each running sshd; removed
    on exit. `suffix` tells apart pairs made by one process."""
    tag = f"{os.getpid() % 100000}{suffix}"
    names = (f"vsA{tag}", f"vsB{tag}")
    addrs = ("10.200.0.1", "10.200.0.2")
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} node{i + 1}\n" for i, a in enumerate(addrs))
    made, procs = [], []
    try:
        for n in names:
            _ip("netns", "add", n)
            made.append(n)
            Path(f"/etc/netns/{n}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{n}/hosts").write_text(hosts)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        for n, dev, addr in zip(names, (f"va{tag}", f"vb{tag}"), addrs, strict=True):
            _ip("link", "set", dev, "netns", n)
            _ip("-n", n, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", n, "link", "set", dev, "up")
            _ip("-n", n, "link", "set", "lo", "up")
            # Notice a dead peer in seconds rather than the default ~15 minutes of TCP retries.
            subprocess.run(["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv4.tcp_retries2=3"], check=True)
        ssh = make_ssh_keys(ssh_dir, 2222, list(addrs))
        pair = NetnsPair(names, addrs, ssh, procs, (f"va{tag}", f"vb{tag}"))
        for i, addr in enumerate(addrs):
            cfg = ssh.dir / f"sshd_config_{i}"
            cfg.write_text((ssh.dir / "sshd_config").read_text().replace(
                "".join(f"ListenAddress {a}\n" for a in addrs), f"ListenAddress {addr}\n"))
            procs.append(subprocess.Popen([*pair.prefix(i), SSHD, "-D", "-e", "-f", str(cfg)],
                                          stdout=subprocess.DEVNULL, stderr=open(ssh.dir / f"sshd{i}.log", "w")))
            wait_port(addr, 2222, prefix=["ip", "netns", "exec", names[i]])
        yield pair
    finally:
        stop(procs)
        for i, n in enumerate(made):
            NetnsPair(names, addrs, None, [], ("", "")).kill_host(i)
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
            shutil.rmtree(f"/etc/netns/{n}", ignore_errors=True)


@pytest.fixture(scope="module")
def netns_pair(tmp_path_factory):
    """make_netns_pair for a test module."""
    need_root("ip", "unshare", SSHD, "ssh")
    with make_netns_pair(tmp_path_factory.mktemp("netns-ssh")) as pair:
        yield pair


# The launcher on node1 starts with a bare environment (what the job needs must travel by itself): the PATH an
# ssh login gets on node2.
NETNS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def netns_launch(pair: NetnsPair, work: Path, job: list[str], timeout: float, *opts: str,
                 grace: float = 30) -> subprocess.Popen:
    """`launch run --launcher torchrun` from node1 over both namespaces (node2 over ssh); run dir work/run."""
    hf = work / "hosts"
    hf.write_text("".join(f"{a} slots=1\n" for a in pair.addrs))
    args = ["run", "--hostfile", str(hf), "--launcher", "torchrun", "--ssh-config", str(pair.ssh.config),
            "--master-port", "29555", "--run-dir", str(work / "run"), "--grace", str(grace), *opts, "--", *job]
    argv = [*pair.prefix(0), "timeout", "-k", "5", str(timeout), sys.executable, "-m", "launch", *args]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": NETNS_PATH, "OMP_NUM_THREADS": "1"})


@dataclass
class Slurm:
    dir: Path
    env: dict  # SLURM_CONF for every Slurm command

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=timeout)

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


_SLURM_CONF = """\
ClusterName=vitscaletest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={m}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
# SIGTERM -> SIGKILL grace: the ranks' agreement + checkpoint on SIGTERM took over 15 s once on a loaded 2-core
# machine (the job then resumed from the older checkpoint); 60 s is > 3x that, and SLURM's default is 30 s
KillWait=60
MinJobAge=600
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={d1_port} CPUs=1 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={d2_port} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd node1/node2 on loopback (own ports, own munge socket and key)."""
    need_root("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool/node1", "spool/node2", "log"):
        (d / sub).mkdir(parents=True)
    # munged runs as the munge user, which cannot enter pytest's private temp dirs: its own dir under /tmp.
    m = Path(tempfile.mkdtemp(prefix="vitscale-munge-"))
    (m / "munge.key").write_bytes(os.urandom(128))
    os.chmod(m, 0o711)
    os.chmod(m / "munge.key", 0o600)
    subprocess.run(["chown", "-R", "munge:munge", str(m)], check=True)
    conf = d / "slurm.conf"
    conf.write_text(_SLURM_CONF.format(d=d, m=m, ctld_port=free_port(), d1_port=free_port(), d2_port=free_port()))
    cluster = Slurm(d, {"SLURM_CONF": str(conf)})
    env = {**os.environ, **cluster.env}
    munged = ["/usr/sbin/munged", "-F", "-f", f"--socket={m}/munge.sock", f"--key-file={m}/munge.key",
              f"--log-file={m}/munged.log", f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"]
    procs = [subprocess.Popen(munged, user="munge", group="munge", stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        for _ in range(50):
            if (m / "munge.sock").exists():
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"munged did not start (exit {procs[0].poll()})")
        logs = open(d / "log" / "daemons.out", "w")
        procs.append(subprocess.Popen(["/usr/sbin/slurmctld", "-D", "-f", str(conf)], env=env, stdout=logs,
                                      stderr=subprocess.STDOUT))
        for node in ("node1", "node2"):
            procs.append(subprocess.Popen(["/usr/sbin/slurmd", "-D", "-N", node, "-f", str(conf)], env=env,
                                          stdout=logs, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 30
        while "idle" not in cluster.run("sinfo", "-h", "-o", "%t %D").stdout or \
                cluster.run("sinfo", "-h", "-t", "idle", "-o", "%D").stdout.strip() != "2":
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM nodes not idle after 30s: {cluster.run('sinfo').stdout}")
            time.sleep(0.3)
        yield cluster
    finally:
        if len(procs) > 1:
            for job in cluster.run("squeue", "-h", "-o", "%i").stdout.split():
                cluster.run("scancel", job)
            deadline = time.monotonic() + 30
            while cluster.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        stop(procs[1:])
        for p in psutil.process_iter(["name"]):  # step daemons of this cluster (known by its SLURM_CONF)
            try:
                if p.info["name"] == "slurmstepd" and p.environ().get("SLURM_CONF") == str(conf):
                    p.kill()
            except psutil.Error:
                pass
        stop(procs[:1])
        shutil.rmtree(m, ignore_errors=True)
