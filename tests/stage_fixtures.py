"""Helpers for the behavioural tests run against both stages (tests/test_stages.py): the same verbs, the same
runs, the same readers, whichever stage (`pretrain` on DeepSpeed, `finetune` on Accelerate) is under test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

from tests.conftest import ROOT, run_torchrun

STAGES = ("pretrain", "finetune")
STEPS = 12
# Short 2-process runs: checkpoints at 4, 8, 12; evals at 6 and 12 (so best/last are written twice); every step
# logged; a short warm-up so that the LR changes at every step.
COMMON = (f"train.steps={STEPS}", "checkpoint.every=4", "eval.every=6", "log.every=1", "optim.warmup_steps=3")
MIXED = ("train.mixup=0.8", "train.cutmix=1.0", "debug.record_keys=true")


def accelerate_run_dir(run: Path, sd: dict[str, torch.Tensor], cfg, class_names: list[str], step: int = 7) -> Path:
    """A run dir whose latest checkpoint holds `sd` in the Accelerate backend's layout with the core's trainer
    state (trainer/checkpoint.py), written without a training run: what the readers of run dirs take."""
    from safetensors.torch import save_file

    tag = run / "checkpoints" / f"global_step{step}"
    tag.mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tag / "model.safetensors"))
    (tag / "trainer_state.json").write_text(json.dumps({
        "step": step, "applied": step, "skipped": 0, "evals": [], "best_top1": -1.0, "stream": {}, "ema_updates": 0,
        "backend": "accelerate", "world_size": 1, "vit_config": cfg.to_json(), "class_names": class_names,
        "eval_settings": {"image_size": list(cfg.image_hw)}}))
    (run / "checkpoints" / "latest").write_text(tag.name)
    return run


def write_init(path: Path) -> Path:
    """A debug ViT (patch 8) at 16 px as a vitscale weight file: fine-tuning's `init=`, resampled to 32 px."""
    from vit import VisionTransformer, vit_config
    from vit.weights import save_weights

    torch.manual_seed(1)
    cfg = vit_config("debug", image_size=16, num_classes=10)
    return save_weights(path, VisionTransformer(cfg).state_dict(), cfg, [str(i) for i in range(10)])


def train_args(stage: str, data: Path | None, run_dir: Path, init: Path, *overrides: str,
               recipe: str = "debug_cpu") -> list[str]:
    """`python -m STAGE train RECIPE ...` arguments; fine-tuning gets `init=` (the one key pre-training lacks)."""
    args = ["-m", stage, "train", recipe, f"run.dir={run_dir}"]
    if data is not None:
        args.append(f"data.path={data}")
    if stage == "finetune":
        args.append(f"init={init}")
    return args + list(overrides)


def train(stage: str, data: Path, run_dir: Path, init: Path, *overrides: str, nproc: int = 2,
          env: dict | None = None, timeout: float = 300) -> tuple[int, str]:
    """A real `torchrun --nproc_per_node=nproc` training job; (exit code, merged output)."""
    proc = run_torchrun(train_args(stage, data, run_dir, init, *overrides), nproc=nproc, extra_env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{stage} job timed out:\n{out[-4000:]}") from None
    return proc.returncode, out


def cli(stage: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """One process of `python -m STAGE args...` (no launcher)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", stage, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the run's latest checkpoint (the core's in-process export)."""
    from trainer.export import consolidate

    return consolidate(run_dir)[0]


def keys(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, micro-batch index) -> its sample keys, in order; where a resumed run rewrote an index, the last
    writer's keys only (a line whose index is lower than its predecessor's starts a new writer)."""
    out: dict[tuple[int, int], list[str]] = {}
    for f in sorted((run_dir / "keys").glob("rank*.txt")):
        rank, writers, prev = int(f.stem.removeprefix("rank")), [], None
        for line in f.read_text().splitlines():
            i, key = line.split("\t")
            if prev is None or int(i) < prev:
                writers.append({})
            writers[-1].setdefault(int(i), []).append(key)
            prev = int(i)
        for batches in writers:  # later writers replace earlier ones
            out.update({(rank, i): k for i, k in batches.items()})
    return out


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder`: relative path -> (size, mtime_ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ---- many CLI calls that fail fast: forked from one process that imported everything once ----------------------

PRELOAD = ("pretrain.__main__", "finetune.__main__", "pretrain.config", "finetune.config", "pretrain.train",
           "finetune.train", "trainer.run", "trainer.backend_deepspeed", "trainer.backend_accelerate")
REPLY = "@@stage-cli "


def serve() -> None:
    """Read `[stage, out_file, err_file, args...]` JSON lines on stdin; run each `python -m stage args` in a fork
    of this process (the imports paid once), its fd 1/2 in the files; reply with its exit code."""
    import importlib
    import traceback

    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        stage, out_file, err_file, *args = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: a fresh `python -m stage` but for the imports
            code = 1
            try:
                for fd, f in ((1, out_file), (2, err_file)):
                    os.dup2(os.open(f, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
                code = importlib.import_module(f"{stage}.__main__").main(args)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(REPLY + json.dumps(os.waitstatus_to_exitcode(status)), flush=True)


class CliServer:
    """Client of `serve` in a subprocess: `run(stage, *args)` ~ `cli(stage, *args)`, without the start-up cost."""

    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", "from tests.stage_fixtures import serve; serve()"],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, stage: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        self.n += 1
        out, err = self.tmp / f"{self.n}.out", self.tmp / f"{self.n}.err"
        self.proc.stdin.write(json.dumps([stage, str(out), str(err), *args]) + "\n")
        self.proc.stdin.flush()
        watchdog = threading.Timer(timeout, self.proc.kill)  # a hung call ends the server, and so this read
        watchdog.start()
        try:
            for line in self.proc.stdout:
                if line.startswith(REPLY):
                    return subprocess.CompletedProcess([stage, *args], json.loads(line.removeprefix(REPLY)),
                                                       out.read_text(), err.read_text())
        finally:
            watchdog.cancel()
        raise AssertionError(f"the CLI server ended (exit {self.proc.wait()}) during {stage} {args}")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- bad inputs for tests/test_stages.py's one-line-error cases --------------------------------------------

def bad_init_safetensors(tmp: Path) -> list[str]:
    from safetensors.torch import save_file

    resnet = {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}
    save_file(resnet, str(tmp / "resnet.safetensors"))
    return [f"init={tmp / 'resnet.safetensors'}"]


def bad_init_pth(tmp: Path) -> list[str]:
    from vit import VisionTransformer, vit_config

    torch.save(VisionTransformer(vit_config("debug", image_size=16, num_classes=10)).state_dict(), tmp / "vit.pth")
    return [f"init={tmp / 'vit.pth'}"]


def missing_shards(tmp: Path, data: Path) -> list[str]:
    copy = Path(shutil.copytree(data.parent, tmp / "shards"))
    next(copy.glob("train*.tar")).unlink()
    return [f"data.path={copy / data.name}"]


def under_a_file(tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("not a folder")
    return [f"run.dir={tmp / 'notes.txt' / 'run'}"]


def fresh_over_a_run(tmp: Path) -> list[str]:
    (tmp / "old" / "checkpoints" / "global_step4").mkdir(parents=True)
    (tmp / "old" / "checkpoints" / "global_step4" / "trainer_state.json").write_text("{}")
    (tmp / "old" / "checkpoints" / "latest").write_text("global_step4")
    return [f"run.dir={tmp / 'old'}", "run.resume=false"]


def edited_manifest(tmp: Path) -> list[str]:
    (tmp / "dataset.json").write_text('{"format": "vitscale-shards/1", "splits": {"train": 1438}}')
    return [f"data.path={tmp / 'dataset.json'}"]
