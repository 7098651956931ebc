"""Shared test fixtures: free TCP ports and a helper to run real multi-process jobs."""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import re
import signal
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


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (the ports it hands to `bind(0)` and to clients)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_PORT_SPAN = 12000  # how many ports below the ephemeral range the tests draw from
_picks = itertools.count()


def free_port() -> int:
    """A TCP port nobody listens on (for MASTER_PORT, sshd, SLURM's daemons), from below the ephemeral range.

    A port the kernel picked (`bind(0)`) and we let go is one it may give to the next socket that needs one (gloo's
    connections between ranks, any client) before our job binds it: torchrun failed with EADDRINUSE that way in
    a CI run. Ports below the ephemeral range are only taken by whoever asks for them by number. Each pytest-xdist
    worker draws from its own slice, from an offset of its process id, 7 apart, so neither two workers nor a
    worker and a helper process it started pick the same port.
    """
    from launch.preflight import port_free

    low = ephemeral_low()
    start = max(1024, low - _PORT_SPAN)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % workers
    span = (low - start) // workers
    base, offset = start + worker * span, os.getpid() * 7919
    for _ in range(span // 7 if span >= 700 else 0):
        port = base + (offset + 7 * next(_picks)) % span
        if port_free("", port):
            return port
    with socket.socket() as s:  # a machine whose ephemeral range starts too low for the above: the kernel's pick
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


@pytest.fixture
def ctrl_c_default():
    """Children start with SIGINT at its default, as from a terminal (a test run in the background of a script
    inherits it ignored, and a process started so keeps ignoring it)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The digits shards (write_digits_shards), written once per test session."""
    return write_digits_shards(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def zero2_digits_run(digits_shards: Path, tmp_path_factory) -> Path:
    """One uninterrupted 2-process ZeRO-2 bf16 pre-training of debug_cpu on the digits shards, read by the
    pre-training tests (report, TensorBoard, export, eval verb) and the few-shot tests: 300 steps, evals and
    checkpoints at 150 and 300, few-shot linear eval (1 and 10 shots, 2 seeds) at steps 0, 150 and 300."""
    from tests.pretrain_fixtures import ZERO2_STEPS, _train

    run = tmp_path_factory.mktemp("zero2_run")
    half = ZERO2_STEPS // 2
    rc, out = _train(digits_shards, run, f"train.steps={ZERO2_STEPS}", f"eval.every={half}", f"checkpoint.every={half}",
                     f"eval.fewshot.datasets=[{digits_shards}]", "eval.fewshot.shots=[1,10]", "eval.fewshot.seeds=2",
                     "log.peak_tflops=0.001",
                     "log.progress_every_s=0")  # every ~10 % mark of the (sub-second) few-shot extractions logged
    assert rc == 0, out[-4000:]
    return run


@pytest.fixture(scope="session")
def cli_server(tmp_path_factory):
    """One process that imported both stages' CLIs and forks a `python -m STAGE args` per call
    (tests/stage_fixtures.py CliServer): seconds per call instead of a fresh interpreter importing torch."""
    from tests.stage_fixtures import CliServer

    server = CliServer(tmp_path_factory.mktemp("cli"))
    yield server
    server.close()


# `slow` means "starts processes" (torchrun jobs, CLIs, launch's nodes, daemons, training runs): `make test-quick`
# (`-m "not slow"`) is the in-process unit tests only. Found from the code rather than kept by hand: a test is
# slow when its own source, a fixture it uses (directly or through other fixtures), or a helper of tests/ that
# either calls (followed through further helpers) starts a process. `@pytest.mark.slow` still marks by hand,
# also the few in-process tests of real-size L/16 models (10-25 s of compute each).
STARTS_PROCESS = re.compile(r"\bsubprocess\.|\bPopen\(|\brun_torchrun\(|\bmultiprocessing\b|\bmp\.Process\(|"
                            r"\bos\.(?:fork|system|exec\w*)\(")
# Fixtures that start real work by a route the source scan does not follow: the fault suite's trial context
# (its scenarios run trainers and CLIs through the catalog's table and the harness's methods), the CLI server
# and the shared ZeRO-2 run (their helpers are imported inside the fixture).
SLOW_FIXTURES = {"ctx", "cli_server", "zero2_digits_run"}
_CALL = re.compile(r"\b([A-Za-z_]\w*)\(")
_starts: dict[object, bool] = {}


def _starts_process(func) -> bool:
    """Whether `func` (a test, fixture or helper in tests/) starts a process, itself or through helpers it calls."""
    func = inspect.unwrap(func)
    if func in _starts:
        return _starts[func]
    _starts[func] = False  # recursion guard
    try:
        src = inspect.getsource(func)
    except (OSError, TypeError):
        return False
    found = bool(STARTS_PROCESS.search(src))
    if not found:
        names = func.__globals__ if inspect.isfunction(func) else vars(sys.modules[func.__module__])
        for name in set(_CALL.findall(src)):
            helper = names.get(name)
            ours = (inspect.isfunction(helper) or inspect.isclass(helper)) and helper.__module__.startswith("tests.")
            if ours and helper is not func and _starts_process(helper):
                found = True
                break
    _starts[func] = found
    return found


# `make test` runs two pytest workers (xdist `--dist loadfile`): a test file to a worker, so its module fixtures are
# made once. The files that read one of these session runs form one unit too, so the run is made once per suite.
SHARED_RUNS = ("zero2_digits_run",)


@functools.cache
def worker_unit(file: str) -> str:
    """The unit of work a test file (`tests/x.py`) goes to a worker in: the shared run one of its tests or fixtures
    takes, or the file itself."""
    text = (ROOT / file).read_text(encoding="utf-8")
    return next((name for name in SHARED_RUNS if re.search(rf"\bdef \w+\([^)]*\b{name}\b", text)), file)


def pytest_xdist_make_scheduler(config, log):
    """xdist's `loadfile` scheduling with worker_unit as the unit (its own `loadgroup` marks need the pytest
    node-id attribute that pytest 9.2 no longer has)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_unit(super()._split_scope(nodeid))

    return SharedRunScheduling(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("slow") or not isinstance(item, pytest.Function):
            continue
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
            continue
        funcs = [item.function]
        for name in item.fixturenames:
            defs = item._fixtureinfo.name2fixturedefs.get(name) or ()
            funcs += [d.func for d in defs]
        if any(_starts_process(f) for f in funcs):
            item.add_marker(pytest.mark.slow)
