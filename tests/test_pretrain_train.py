"""Pre-training end to end on real images (sklearn digits as shards), real DeepSpeed on gloo, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.launch_fixtures import ds_ops_vars
from tests.pretrain_fixtures import ZERO2_STEPS, _export, _report, _scalars, _train
from tests.stage_fixtures import CliServer

pytestmark = pytest.mark.slow
STEPS = ZERO2_STEPS  # the shared run: checkpoints and evals at 150 and 300, loss logged every 20 steps


def _export_served(server: CliServer, run_dir: Path, *extra: str) -> dict[str, torch.Tensor]:
    """`pretrain export RUN_DIR` through the CLI server (the real `python -m pretrain export` runs in
    test_export_equals_live_model); the exported weights under vitscale's key names."""
    from vit.weights import load_weights

    out = run_dir / "export" / "model.safetensors"
    proc = server.run("pretrain", "export", str(run_dir), "--out", str(out), *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_weights(out)[0]


def _data_path(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["path"]


@pytest.fixture
def baseline(zero2_digits_run: Path) -> Path:
    """The shared uninterrupted 2-process ZeRO-2 bf16 run (tests/conftest.py): 300 steps, evals at 150 and 300."""
    return zero2_digits_run


def test_learns_digits_zero2(baseline: Path) -> None:
    report = _report(baseline)
    assert report["steps"] == report["total_steps"] == report["applied_steps"] == STEPS
    assert report["skipped_steps"] == 0 and report["world_size"] == 2
    assert (report["stage"], report["backend"], report["weights"]) == ("pretrain", "deepspeed", "model")
    assert report["image_size"] == [32, 32] and report["config"]["zero"]["stage"] == 2
    assert len(report["rank_digests"]) == 2 and len(set(report["rank_digests"])) == 1  # ranks hold one model
    assert report["last"]["top1"] >= 0.3, report  # chance is 0.10; seeds 0, 1, 2 gave 0.70, 0.58, 0.60
    assert [m["step"] for m in report["evals"]] == [STEPS // 2, STEPS] and report["last"] == report["evals"][-1]
    assert report["best"]["top1"] == max(m["top1"] for m in report["evals"])
    manifest = json.loads(Path(_data_path(baseline)).read_text())
    assert report["last"]["samples"] == manifest["splits"]["val"]["samples"]  # the whole val split, each image once
    losses = [v for _, v in _scalars(baseline)["train/loss"]]
    assert losses[-1] < losses[0] * 0.8


def test_tensorboard_has_the_scalars(baseline: Path) -> None:
    s = _scalars(baseline)
    wanted = {"train/loss", "train/lr", "train/grad_norm", "perf/img_per_s", "perf/img_per_s_per_gpu", "perf/mfu",
              "perf/data_wait_share", "perf/step_time", "eval/top1", "eval/top5", "eval/loss", "train/skipped_steps"}
    assert wanted <= set(s), wanted - set(s)
    assert [step for step, _ in s["train/loss"]] == list(range(20, STEPS + 1, 20))
    assert s["train/lr"][-1][1] < s["train/lr"][0][1]  # cosine decay after warm-up
    assert set(s["_images"]) == {"train/batch"} | {f"inspect/{f}" for f in (  # eval.inspect: the figures at evals
        "embedding_filters", "pos_embed_similarity", "attention_distance", "attention_rollout")}
    assert all(v > 0 for _, v in s["perf/img_per_s"])


def test_export_equals_live_model(baseline: Path) -> None:
    exported = _export(baseline)  # a fresh `python -m pretrain export`: the entry point itself
    # DeepSpeed's module weights at the last save are the bf16 copy of the fp32 master weights we export.
    live = torch.load(baseline / "checkpoints" / f"global_step{STEPS}" / "mp_rank_00_model_states.pt",
                      map_location="cpu", weights_only=False)["module"]
    assert exported.keys() == live.keys()
    for k, v in live.items():
        assert torch.equal(exported[k].to(v.dtype), v), k
    from vit.weights import read_metadata

    meta = read_metadata(baseline / "export" / "model.safetensors")
    assert meta["step"] == STEPS and meta["class_names"] == [str(i) for i in range(10)]


@pytest.mark.parametrize("weights", ["run_dir", "last.safetensors", "best.safetensors"])
def test_eval_verb_matches_training_eval(weights: str, baseline: Path, digits_shards: Path,
                                        cli_server: CliServer) -> None:
    """`eval` of the run dir (its latest checkpoint) or of the weight files the run kept repeats the run's own
    eval exactly: the files carry their eval settings (crop_pct, precision bf16, ...). The run dir in a fresh
    `python -m pretrain eval` (the entry point itself), the files through the CLI server (the same main)."""
    path = baseline if weights == "run_dir" else baseline / weights
    args = ["eval", str(path), f"data.path={digits_shards}"]
    if weights == "run_dir":
        out = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        out = cli_server.run("pretrain", *args, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    report = _report(baseline)
    want = report["best"] if weights == "best.safetensors" else report["last"]
    assert metrics["samples"] == want["samples"] and metrics["precision"] == "bf16"
    assert metrics["top1"] == want["top1"] and metrics["top5"] == want["top5"], (metrics, want)


def test_zero_stages_1_and_3_train_like_each_other(digits_shards: Path, tmp_path: Path,
                                                  cli_server: CliServer) -> None:
    """ZeRO-1 (with EMA) and ZeRO-3 (which partitions the weights too) on the same seed and data train the same
    model: their loss curves agree, and fall. (Top-1 after 20 steps is no test: 0.14-0.21 over seeds 0-2, where
    the two stages differed by at most 0.0026 in loss.)"""
    curves = {}
    for stage in (1, 3):
        run = tmp_path / f"zero{stage}"
        ema = ["train.ema_decay=0.9"] if stage == 1 else []  # EMA needs full weights on every rank: ZeRO <= 2
        rc, out = _train(digits_shards, run, f"zero.stage={stage}", "train.steps=20", "checkpoint.every=0",
                         "log.every=5", *ema)
        assert rc == 0, out[-4000:]
        curves[stage] = [v for _, v in _scalars(run)["train/loss"]]
        assert len(curves[stage]) == 4 and curves[stage][-1] < curves[stage][0], curves[stage]
        assert (run / "checkpoints" / "latest").read_text() == "global_step20"
        digests = _report(run)["rank_digests"]
        assert digests is None if stage == 3 else (len(digests) == 2 and digests[0] == digests[1])
        weights = _export_served(cli_server, run)
        assert _report(run)["weights"] == ("ema" if ema else "model")  # what the reported top-1 evaluated
        if ema:
            averaged = _export_served(cli_server, run, "--ema")
            assert averaged.keys() == weights.keys()
            assert 0 < max((averaged[k] - weights[k]).abs().max().item() for k in weights) < 0.5
    assert max(abs(a - b) for a, b in zip(curves[1], curves[3], strict=True)) < 0.01, curves


def test_bad_configs_fail_before_training(digits_shards: Path, tmp_path: Path, cli_server: CliServer) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:  # the real entry point: the torchrun job below
        return cli_server.run("pretrain", "train", "debug_cpu", *args)

    r = cli(f"run.dir={tmp_path}")
    assert r.returncode == 2 and "data.path is required" in r.stderr
    r = cli(f"run.dir={tmp_path}", "data.path=/nope/dataset.json")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = cli(f"run.dir={tmp_path}", f"data.path={digits_shards}", "train.lr=0.1")
    assert r.returncode == 2 and "unknown config key 'train.lr'" in r.stderr
    t0 = time.time()
    rc, out = _train(digits_shards, tmp_path, "train.global_batch=30", timeout=120)
    assert rc != 0 and "error: global batch 30 is not divisible by micro-batch 8 x world size 2" in out
    assert "exitcode  : 2" in out  # the ranks' exit code for bad input (torchrun's summary names it)
    assert time.time() - t0 < 100 and not any(tmp_path.iterdir())  # nothing written: no log, no checkpoints


def test_deepspeed_starts_without_mlflow_or_inductor() -> None:
    """`import deepspeed` would import mlflow (its autotuner's, when installed), and its ZeRO/bf16 optimizers'
    Muon module would load torch's inductor compiler: seconds of every rank's start (docs/performance.md). The
    backend's import leaves both out, ZeRO's own import of the Muon module finds it loaded, and `import mlflow`
    still works afterwards."""
    code = ("import sys; from trainer.backend_deepspeed import UNUSED_IMPORT; import deepspeed.autotuning.autotuner "
            "as at; assert UNUSED_IMPORT not in sys.modules and not at.has_mlflow, sys.modules.get(UNUSED_IMPORT); "
            "import deepspeed.runtime.zero.stage_1_and_2, deepspeed.runtime.zero.muon.muon_optimizer; "
            "assert 'torch._inductor' not in sys.modules, 'inductor loaded'; "
            "import mlflow; print('ok', mlflow.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=os.environ | ds_ops_vars() | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "ok mlflow" in proc.stdout, proc.stderr[-3000:]


def test_compile_deferred_to_the_first_call_while_deepspeed_imports() -> None:
    """What the backend's import defers (the Muon module's `torch.compile`) still compiles, at its first call,
    with the arguments given, and gives the function's results; `torch.compile` is torch's own afterwards."""
    from trainer.backend_deepspeed import _compile_on_first_call

    graphs: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(example_inputs))
        return gm.forward

    real = torch.compile
    with _compile_on_first_call():
        assert torch.compile is not real
        plain = torch.compile(lambda x: x * 2 + 1, backend=backend)

        @torch.compile(backend=backend)
        def decorated(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x @ y

    assert torch.compile is real and graphs == []  # nothing compiled yet
    x, y = torch.randn(3, 3), torch.randn(3, 3)
    assert torch.equal(plain(x), x * 2 + 1) and graphs == [1]
    assert torch.allclose(decorated(x, y), x @ y) and graphs == [1, 2] and decorated.__name__ == "decorated"
    plain(x)
    assert graphs == [1, 2]  # compiled once


GATHER = """
import warnings, torch, torch.distributed as dist
if {backend}:
    import trainer.backend_deepspeed  # noqa: F401
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))  # as DeepSpeed's ZeRO optimizers gather partitions
warnings.warn("another deprecation", FutureWarning)
dist.destroy_process_group()
"""


@pytest.mark.parametrize("backend", [False, True])
def test_deepspeeds_deprecated_gather_is_the_only_warning_hidden(backend: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTHONWARNINGS", None)  # Python's defaults: FutureWarning shows
    r = subprocess.run([sys.executable, "-c", GATHER.format(backend=backend)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "another deprecation" in r.stderr
    # without the backend torch still warns (when it stops, the filter can go); with it, every rank is quiet
    assert ("all_gather_into_tensor` is deprecated" in r.stderr) != backend, r.stderr
