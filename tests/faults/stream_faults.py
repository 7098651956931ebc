"""Stream faults: broken shards under real pre-training, and tar members whose names try to escape.

bad-data-stream breaks a copy of digits shards in every way the stream promises to survive (a truncated shard,
a shard of random bytes, a sample without `.cls`, a label outside the classes, a 1x1 image), runs the real
2-rank pre-training over exactly one epoch and checks that training ends, that the skipped counts in the log
and in TensorBoard equal what was injected per reason, and that every good sample was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from data_prep import write_example_images, write_shards
from data_prep.__main__ import main as data_prep_main
from data_prep.stream import DataCfg, build_loader
from runtime.dist import DistEnv
from tests.conftest import ROOT, run_torchrun
from tests.faults.harness import Ctx, Outcome, scenario
from tests.launch_fixtures import ds_ops_vars
from tests.pretrain_fixtures import _keys, _scalars

GLOBAL_BATCH = 32  # debug_cpu


def epoch_shards(ctx: Ctx) -> Path:
    """Digits shards whose train split is a whole number of global batches (640 = 20 x 32), so that one epoch
    reads every sample and every injected fault; written once per session. Returns the folder."""
    root = ctx.cache / "epoch-digits"
    if not (root / "out" / "dataset.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_example_images(root / "images", "digits", size=32, per_class=64)
        write_shards(root / "images", root / "out", samples_per_shard=40, dedup=False, seed=1)
    return root / "out"


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_members(path: Path, items: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edit_sample(path: Path, key: str, edit: Callable[[dict[str, bytes]], dict[str, bytes]]) -> None:
    """Rewrite one sample of a shard: `edit` maps its {ext: bytes} to the new members."""
    items, sample = [], {}
    for m, data in members(path):
        k, _, ext = m.name.partition(".")
        if k == key:
            sample[ext] = data
            if len(sample) == 3:  # png, cls, json: the whole sample, in order
                items += [(f"{key}.{e}", d) for e, d in edit(sample).items()]
        else:
            items.append((m.name, data))
    write_members(path, items)


def readable_keys(path: Path, cut: int) -> set[str]:
    """Keys a streaming reader can still deliver from `path` cut at byte `cut`: a sample is delivered once the
    next sample's first member (header, data and padding) has been read whole."""
    order, first_end = [], {}
    for m, _ in members(path):
        key = m.name.partition(".")[0]
        if key not in first_end:
            order.append(key)
            first_end[key] = m.offset_data + (m.size + 511) // 512 * 512
    return {k for k, nxt in zip(order, order[1:], strict=False) if first_end[nxt] <= cut}


def sample_keys(path: Path) -> list[str]:
    return list(dict.fromkeys(m.name.partition(".")[0] for m, _ in members(path)))


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def break_shards(ctx: Ctx, data: Path) -> tuple[dict[str, int], set[str]]:
    """Inject one fault of each kind into `data` (a copy); returns (expected counts by reason, keys lost)."""
    manifest = json.loads((data / "dataset.json").read_text())
    names = [s["name"] for s in manifest["splits"]["train"]["shards"]]
    truncated, garbage, *rest = ctx.rng.sample(names, len(names))
    lost = set(sample_keys(data / garbage))
    path = data / truncated
    cut = int(path.stat().st_size * ctx.rng.uniform(0.3, 0.7))
    lost |= set(sample_keys(path)) - readable_keys(path, cut)
    path.write_bytes(path.read_bytes()[:cut])
    path = data / garbage
    path.write_bytes(ctx.rng.randbytes(path.stat().st_size))
    n_classes = len(manifest["classes"])
    edits = [("bad_label", lambda s: {e: d for e, d in s.items() if e != "cls"}),  # no .cls at all
             ("bad_label", lambda s: {**s, "cls": str(n_classes + ctx.rng.randrange(5)).encode()}),
             ("too_small", lambda s: {"png": png(1, 1), **{e: d for e, d in s.items() if e != "png"}})]
    for _, edit in edits:
        shard = data / ctx.rng.choice(rest)
        key = ctx.rng.choice([k for k in sample_keys(shard) if k not in lost])
        edit_sample(shard, key, edit)
        lost.add(key)
    expected = {"truncated_shard": 1, "unreadable_shard": 1, "bad_label": 2, "too_small": 1}
    return expected, lost


def _logged_skips(log: str) -> dict[str, int]:
    """The last `data skipped: reason n, ...` of the training log."""
    found = re.findall(r"data skipped: ([^\n|]+)", log)
    assert found, f"the training log never reports skipped data:\n{log[-3000:]}"
    return {r: int(n) for r, n in (item.rsplit(" ", 1) for item in found[-1].strip().split(", "))}


@scenario("bad-data-stream", "truncated and random-bytes shards, a sample without .cls, a label outside the "
                             "classes and a 1x1 image under real 2-rank pre-training: skipped, counted exactly")
def bad_data_stream(ctx: Ctx) -> Outcome:
    data = ctx.work / "data"
    shutil.copytree(epoch_shards(ctx), data)
    expected, lost = break_shards(ctx, data)
    all_keys = {k for p in epoch_shards(ctx).glob("train-*.tar") for k in sample_keys(p)}
    steps = json.loads((data / "dataset.json").read_text())["splits"]["train"]["samples"] // GLOBAL_BATCH
    run_dir = ctx.work / "run"
    args = ["-m", "pretrain", "train", "debug_cpu", f"data.path={data / 'dataset.json'}", f"run.dir={run_dir}",
            f"train.steps={steps}", "data.val_split=null", "log.every=5", "checkpoint.every=0",
            "debug.record_keys=true", "log.peak_tflops=0.001"]
    proc = run_torchrun(args, nproc=2, extra_env=ds_ops_vars())  # the op cache of the tests, built once
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"training on broken shards failed:\n{log[-4000:]}"
    assert json.loads((run_dir / "report.json").read_text())["steps"] == steps, "training stopped early"
    zeros = {r: 0 for r in _logged_skips(log)}
    logged = {**zeros, **_logged_skips(log)}
    assert {r: n for r, n in logged.items() if n} == expected, f"log counts {logged}, injected {expected}"
    tb = {tag.removeprefix("data/skipped_"): vals[-1] for tag, vals in _scalars(run_dir).items()
          if tag.startswith("data/skipped_")}
    assert tb and all(step == steps for step, _ in tb.values()), f"TensorBoard data/skipped_* missing: {tb}"
    assert {r: int(v) for r, (_, v) in tb.items() if v} == expected, f"TensorBoard counts {tb}, injected {expected}"
    seen = {k for keys in _keys(run_dir).values() for k in keys}
    unseen = (all_keys - lost) - seen
    return Outcome(data_lost=len(unseen), detail=f"{steps} steps over {len(all_keys)} samples; injected {expected}",
                   extra={"injected": expected, "logged": logged, "faulty_samples": len(lost)})


def _cli(argv: list[str]) -> tuple[int, str]:
    """`python -m data_prep ARGV` run in this process: (exit status, stdout + stderr)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = data_prep_main(argv)
    return rc, buf.getvalue()


def unsafe_shard(ctx: Ctx, escape: Path) -> tuple[Path, list[str]]:
    """A dataset whose first train shard also holds members named `../../etc/x.png` and an absolute path under
    `escape`; the manifest is updated to match (a tampered shard, not a truncated one)."""
    data = ctx.work / "data"
    shutil.copytree(ctx.digits.parent, data)
    manifest = json.loads((data / "dataset.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    path = data / entry["name"]
    bad = ["../../etc/x.png", str(escape / "y.png")]
    items = [(m.name, d) for m, d in members(path)]
    at = ctx.rng.randrange(1, len(items) // 3) * 3  # between two samples
    write_members(path, items[:at] + [(bad[0], png(8, 8))] + items[at:] + [(bad[1], png(8, 8))])
    raw = path.read_bytes()
    entry.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (data / "dataset.json").write_text(json.dumps(manifest))
    return data, bad


@scenario("unsafe-tar-member", "tar members named ../../etc/x.png or an absolute path: the stream skips and counts "
                               "them, verify names them in one line each, preview writes only its own file")
def unsafe_tar_member(ctx: Ctx) -> Outcome:
    escape = ctx.work.parent / f"escape-{ctx.rng.getrandbits(32):08x}"  # outside the trial dir
    data, bad = unsafe_shard(ctx, escape)
    dest = ctx.work / "preview" / "grid.png"
    places = [Path("/etc/x.png"), escape / "y.png", escape, (ROOT / bad[0]).resolve(),
              (data / bad[0]).resolve(), (dest.parent / bad[0]).resolve()]
    assert not any(p.exists() for p in places), "a file the test is about to watch for exists already"
    ld = build_loader(DataCfg(path=str(data / "dataset.json"), workers=0), "train", train=False, dist_env=DistEnv(),
                      image_size=32, micro_batch=64, seed=0, device="cpu")
    n = sum(int((labels >= 0).sum()) for _, labels in ld)
    manifest = json.loads((data / "dataset.json").read_text())
    assert n == manifest["splits"]["train"]["samples"], f"the stream delivered {n} samples"
    assert ld.stats["by_reason"]["unsafe_member"] == 2, ld.stats
    rc, out = _cli(["verify", str(data)])  # the CLI in this process: a subprocess would only add start-up time
    assert rc == 1, out
    shard = manifest["splits"]["train"]["shards"][0]["name"]
    for name in bad:
        lines = [ln for ln in out.splitlines() if repr(name) in ln]
        assert len(lines) == 1 and lines[0].startswith(f"{shard}: member"), f"verify output:\n{out}"
    rc, out = _cli(["preview", str(data), "--out", str(dest)])
    assert rc == 0, out
    assert sorted(p.name for p in dest.parent.iterdir()) == ["grid.png"], "preview wrote more than its grid"
    leaked = [str(p) for p in places if p.exists()]
    assert not leaked, f"files written outside the trial dir: {leaked}"
    return Outcome(data_lost=manifest["splits"]["train"]["samples"] - n, detail=f"members {bad} in {shard}",
                   extra={"unsafe_counted": ld.stats["by_reason"]["unsafe_member"]})
