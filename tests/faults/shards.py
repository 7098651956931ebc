"""Shard-writer faults: kill -9 of the whole writer at random moments, and a disk that fills up mid-write.

Both compare against one uninterrupted `python -m data_prep write` of the same images (cached per session):
after the fault and a rerun, the output folder must be byte-identical to it, with no temporary file left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from data_prep import write_example_images
from data_prep.verify import iter_samples
from tests.data_prep_fixtures import data_prep_cli, output_files
from tests.faults.harness import Ctx, Outcome, scenario, wait_exit
from tests.launch_fixtures import need_root

WRITE_OPTS = ["--workers", "2", "--samples-per-shard", "40", "--seed", "7"]


def reference(ctx: Ctx) -> tuple[Path, Path, float]:
    """(source images, uninterrupted output, its wall seconds), written once per session into ctx.cache."""
    root = ctx.cache / ("shard-writer-full" if ctx.full else "shard-writer")
    if not (root / "done.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        # digits PNGs: the full version upscales them further so that a run lasts long enough to hit anywhere
        write_example_images(root / "images", "digits", size=96 if ctx.full else 40)
        t0 = time.monotonic()
        proc = data_prep_cli(["write", str(root / "images"), str(root / "out"), *WRITE_OPTS])
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"the uninterrupted write failed:\n{log[-3000:]}"
        (root / "done.json").write_text(json.dumps({"seconds": time.monotonic() - t0}))
    return root / "images", root / "out", json.loads((root / "done.json").read_text())["seconds"]


def lost_samples(ref: Path, out: Path) -> int:
    """Samples of the reference output that are missing from `out` or differ there (members and bytes)."""
    manifest = json.loads((ref / "dataset.json").read_text())
    lost = 0
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            want = dict(iter_samples(ref / shard["name"]))
            try:
                got = dict(iter_samples(out / shard["name"]))
            except (OSError, EOFError, ValueError):  # missing or unreadable shard: all of its samples are lost
                got = {}
            lost += sum(got.get(key) != sample for key, sample in want.items())
    return lost


def temp_files(out: Path) -> list[str]:
    """Temporary files anywhere under an output folder (shards and atomic writes use a .tmp suffix)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.tmp"))


def assert_finished_shards_intact(out: Path, ref: Path) -> int:
    """Every file under a final name is complete: equal to the reference's file of that name. Returns how many."""
    ref_files, n = output_files(ref), 0
    for name, data in output_files(out).items():
        if name.endswith(".tmp"):  # a killed write's temp file: not a final name (the rerun replaces it)
            continue
        assert name in ref_files, f"{out / name}: a file the uninterrupted run does not write"
        assert data == ref_files[name], f"{out / name}: differs from the uninterrupted run's (half-written?)"
        n += name.endswith(".tar")
    return n


def _group_gone(pgid: int, timeout: float) -> None:
    """Wait until no process of group `pgid` is left (the writer's workers die with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"processes of group {pgid} still alive {timeout:.0f} s after kill -9")


def _finished_shards(out: Path) -> int:
    receipts = out / ".parts" / "shards"
    return sum(not p.name.startswith(".") for p in receipts.iterdir()) if receipts.exists() else 0


def _run_and_kill(args: list[str], out: Path, after_shards: int, extra_s: float) -> float | None:
    """Start the writer; once `after_shards` shards are finished, wait `extra_s` and kill -9 its process group.
    Seconds from the kill to the exit, or None if the write finished first."""
    proc = data_prep_cli(args)
    while proc.poll() is None and _finished_shards(out) < after_shards:
        time.sleep(0.005)
    try:
        log, _ = proc.communicate(timeout=extra_s)
        assert proc.returncode == 0, f"the write failed on its own:\n{log[-3000:]}"
        return None
    except subprocess.TimeoutExpired:
        since = time.time()
        os.killpg(proc.pid, signal.SIGKILL)
        exit_s = wait_exit([proc], since, timeout=30)
        _group_gone(proc.pid, timeout=30)
        proc.communicate()
        return exit_s


@scenario("shard-writer-kill", "kill -9 of the whole shard writer at random moments, then a rerun: byte-identical "
                               "shards and dataset.json, no temporary file left")
def shard_writer_kill(ctx: Ctx) -> Outcome:
    images, ref, seconds = reference(ctx)
    out = ctx.work / "out"
    args = ["write", str(images), str(out), *WRITE_OPTS]
    n = len(list(ref.glob("*.tar")))
    # A moment = (shards finished, then a delay of up to one shard's time), drawn in increasing order so that
    # each kill lands in the rerun that follows the previous one, whatever the machine's speed.
    # 0 shards: the kill hits start-up, listing, indexing or planning.
    moments = sorted((ctx.rng.randrange(n), ctx.rng.uniform(0, seconds / n)) for _ in range(10 if ctx.full else 2))
    exits, finished = [], 0
    for after_shards, extra_s in moments:
        exit_s = _run_and_kill(args, out, after_shards, extra_s)
        finished += exit_s is None
        if exit_s is not None:
            exits.append(exit_s)
        if out.exists():  # whatever was killed, nothing under a final name is half-written
            assert_finished_shards_intact(out, ref)
    proc = data_prep_cli(args)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"the rerun after the kills failed:\n{log[-3000:]}"
    assert output_files(out) == output_files(ref), "rerun output is not byte-identical to the uninterrupted run"
    assert not temp_files(out), f"temporary files left after the rerun: {temp_files(out)[:5]}"
    where = ", ".join(f"{k}/{n} shards + {e:.2f} s" for k, e in moments)
    return Outcome(data_lost=lost_samples(ref, out), exit_s=max(exits, default=None),
                   detail=f"{len(exits)} kill(s) at {where} ({finished} run(s) finished before their kill)",
                   extra={"kills": len(exits), "write_s": round(seconds, 2)})


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` KiB mounted at `path` (root only), unmounted on the way out."""
    need_root("mount")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@scenario("disk-full-shards", "the shard output disk fills up mid-write: one clear ENOSPC error, finished shards "
                              "intact, no temp file; after freeing space a rerun completes byte-identical")
def disk_full_shards(ctx: Ctx) -> Outcome:
    images, ref, _ = reference(ctx)
    total_kb = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file()) // 1024
    small = int(total_kb * ctx.rng.uniform(0.2, 0.7))  # full somewhere in the middle of the shards
    with tmpfs(ctx.work / "out", small) as out:  # same folder name: _info.json names it
        args = ["write", str(images), str(out), *WRITE_OPTS]
        t0 = time.time()
        proc = data_prep_cli(args)
        log = proc.communicate(timeout=600)[0]
        exit_s = time.time() - t0
        assert proc.returncode != 0, f"the write into a {small} KiB disk did not fail:\n{log[-2000:]}"
        assert "Traceback" not in log, f"a full disk gave a traceback, not a clear error:\n{log[-3000:]}"
        error = log.strip().splitlines()[-1]
        for word in ("ENOSPC", str(out), "free space", "rerun"):
            assert word in error, f"the disk-full error does not name {word!r}: {error}"
        finished = assert_finished_shards_intact(out, ref)
        assert finished >= 1, f"no shard finished on a {small} KiB disk: size it bigger ({error})"
        assert not (out / "dataset.json").exists(), "dataset.json written although shards are missing"
        assert not temp_files(out), f"temporary files left after the failed write: {temp_files(out)[:5]}"
        subprocess.run(["mount", "-o", f"remount,size={2 * total_kb + 1024}k", str(out)], check=True)
        proc = data_prep_cli(args)
        log = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"the rerun after freeing space failed:\n{log[-3000:]}"
        assert output_files(out) == output_files(ref), "rerun output is not byte-identical to the uninterrupted run"
        assert not temp_files(out), f"temporary files left after the rerun: {temp_files(out)[:5]}"
        lost = lost_samples(ref, out)
    return Outcome(data_lost=lost, exit_s=exit_s,
                   detail=f"disk of {small} KiB for {total_kb} KiB of output: failed after {finished} shard(s)",
                   extra={"disk_kb": small, "output_kb": total_kb, "shards_before_full": finished})
