"""`make demo`: the whole vitscale pipeline on real images shipped with scikit-learn, in minutes on a CPU.

    python scripts/demo.py [--out runs/demo] [--pretrain-steps 500] [--finetune-steps 150] [--nproc N]

1. data: scikit-learn's 1797 handwritten digits (8x8) upscaled to 64 px PNG class folders -> `data_prep write`
   (shards + dataset.json), `verify --decode`, `preview`; the two sample photos -> shards -> a preview too;
2. `pretrain train`: a debug ViT (patch 8) at 32 px (a 4x4 grid) with DeepSpeed ZeRO-2 in bf16, 2 processes
   under torchrun (on a GPU machine, one per GPU);
3. `pretrain export` -> model.safetensors;
4. `finetune eval` at 64 px (an 8x8 grid, pos-embed interpolated), no training;
   (few-shot linear eval on the digits at initialisation, mid-way and at the end: `eval.fewshot.*`);
5. `finetune train` at 64 px with Accelerate, then `finetune eval` of the best weights;
6. `vit inspect` of the fine-tuned weights: embedding filters, pos-embed similarity, attention distance and
   rollout figures in OUT/inspect/;
7. a table: samples, shards, accuracies, images/s of each stage, wall time, where logs and weights are.

Every stage is the real CLI, run as a subprocess; its command is printed first, so it can be copied. A stage
whose outputs are complete is skipped when the demo is run again; an interrupted training resumes from its
last checkpoint. Everything goes under --out (default runs/demo).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import the repo's packages

from runtime.io import atomic_write_json  # noqa: E402

GLOBAL_BATCH = 32
PRETRAIN_PX, FINETUNE_PX = 32, 64  # debug ViT, patch 8: a 4x4 grid, then 8x8
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")
FIRST_START = ("(the first DeepSpeed start on a CPU compiles its shared-memory op: a minute or two, once; cached "
               "under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)")
OUR_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # the trainers' console format: time, [rank r], message


@dataclass
class Stage:
    """One CLI run: its command, the files that say it is complete, and what to read from it afterwards."""

    name: str
    argv: list[str]
    outputs: list[Path] = field(default_factory=list)  # all must exist (and the stage be recorded) to skip it
    env: dict[str, str] = field(default_factory=dict)  # shown in front of the command
    steps: int | None = None  # training: a progress bar over the optimizer steps its log lines report
    json_out: Path | None = None  # the command prints one JSON line last: kept in this file
    note: str = ""  # printed under the command
    collect: Callable[[], dict] = dict  # facts for the table (images, img/s, metrics), read after it ran


def _shown(path: str | os.PathLike) -> str:
    """A path as a command should show it: relative to the repo root (where commands run) when inside it."""
    p = os.path.abspath(path)
    return os.path.relpath(p, ROOT) if p.startswith(str(ROOT) + os.sep) else p


def _python() -> list[str]:
    return [_shown(sys.executable)]


def _torchrun(nproc: int) -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [_shown(exe)] if exe.exists() else [*_python(), "-m", "torch.distributed.run"]
    return [*launcher, "--standalone", "--nproc_per_node", str(nproc)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _tb_img_per_s(tb_dir: Path) -> float | None:
    """Median of the trainer's own `perf/img_per_s` windows, the first (start-up) left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if "perf/img_per_s" not in acc.Tags()["scalars"]:
        return None
    values = [e.value for e in acc.Scalars("perf/img_per_s")]
    return statistics.median(values[1:] or values) if values else None


def data_stages(out: Path, photos: bool) -> list[Stage]:
    """Example images -> shards -> verify -> preview (digits; and the sample photos, for the preview only)."""
    py, dp = _python(), ["-m", "data_prep"]
    images, shards = out / "images", out / "shards"
    manifest = shards / "dataset.json"

    def n_samples() -> int:
        return sum(s["samples"] for s in _read_json(manifest)["splits"].values())

    stages = [
        Stage("digits", [*py, *dp, "example", _shown(images), "--dataset", "digits", "--size", str(FINETUNE_PX)],
              [images], collect=lambda: {"images": sum(1 for _ in images.rglob("*.png"))}),
        Stage("shards", [*py, *dp, "write", _shown(images), _shown(shards), "--val-fraction", "0.2",
                         "--samples-per-shard", "250", "--seed", "0"], [manifest],
              collect=lambda: {"images": n_samples()}),
        Stage("verify", [*py, *dp, "verify", _shown(shards), "--decode"], collect=lambda: {"images": n_samples()}),
        Stage("preview", [*py, *dp, "preview", _shown(shards), "--out", _shown(out / "preview_digits.png")],
              [out / "preview_digits.png"]),
    ]
    if photos:
        src, dst, png = out / "photos", out / "photo_shards", out / "preview_photos.png"
        stages += [
            Stage("photos", [*py, *dp, "example", _shown(src), "--dataset", "photos"], [src]),
            Stage("photo_shards", [*py, *dp, "write", _shown(src), _shown(dst), "--resize-shorter", "160",
                                   "--samples-per-shard", "8", "--no-progress"], [dst / "dataset.json"]),
            Stage("photo_preview", [*py, *dp, "preview", _shown(dst), "--out", _shown(png), "--n", "16"], [png]),
        ]
    return stages


def model_stages(out: Path, args: argparse.Namespace) -> list[Stage]:
    """Pre-train at 32 px, export, evaluate at 64 px, fine-tune at 64 px, evaluate."""
    py, data = _python(), f"data.path={_shown(out / 'shards' / 'dataset.json')}"
    pre, ft = out / "pretrain", out / "finetune"
    weights, best = pre / "export" / "model.safetensors", ft / "best.safetensors"
    threads = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
    micro = f"train.micro_batch={GLOBAL_BATCH // args.nproc}"  # no accumulation
    seed = f"run.seed={args.seed}"

    def evaluate(w: Path) -> list[str]:
        return [*py, "-m", "finetune", "eval", _shown(w), data, f"model.image_size={FINETUNE_PX}",
                "data.crop_pct=1.0", "data.workers=1"]

    def trained(run: Path, steps: int, top1: Callable[[dict], float]) -> dict:
        report = _read_json(run / "report.json")
        fewshot = {"fewshot_before": report["fewshot"][0]["shards"],
                   "fewshot_after": report["fewshot"][-1]["shards"]} if report.get("fewshot") else {}
        return {"images": steps * GLOBAL_BATCH, "img_per_s": _tb_img_per_s(run / "tb"), "top1": top1(report),
                **fewshot}

    def evaluated(path: Path) -> dict:
        m = _read_json(path)
        return {"images": m["samples"], "top1": m["top1"]}

    p_steps, f_steps = args.pretrain_steps, args.finetune_steps
    return [
        Stage("pretrain", [*_torchrun(args.nproc), "-m", "pretrain", "train", "debug_cpu", data,
                           f"run.dir={_shown(pre)}", f"model.image_size={PRETRAIN_PX}", f"train.steps={p_steps}",
                           micro, f"eval.every={max(1, p_steps // 2)}", "log.every=10", "checkpoint.every=100",
                           f"eval.fewshot.datasets=[{_shown(out / 'shards' / 'dataset.json')}]",
                           "eval.fewshot.shots=[1,5,10]", seed],
              [pre / "report.json"], threads, p_steps,
              collect=lambda: trained(pre, p_steps, lambda r: r["last"]["top1"]),
              note=FIRST_START if args.cpu else ""),
        Stage("export", [*py, "-m", "pretrain", "export", _shown(pre), "--out", _shown(weights)], [weights]),
        Stage("eval_before", evaluate(weights), [out / "eval_before.json"], json_out=out / "eval_before.json",
              collect=lambda: evaluated(out / "eval_before.json")),
        Stage("finetune", [*_torchrun(args.nproc), "-m", "finetune", "train", "debug_cpu", f"init={_shown(weights)}",
                           data, f"run.dir={_shown(ft)}", f"model.image_size={FINETUNE_PX}", f"train.steps={f_steps}",
                           micro, "optim.lr=0.05", "data.hflip=0.0", "data.scale=[0.9,1.0]",
                           f"eval.every={max(1, f_steps // 2)}", "log.every=10", "checkpoint.every=50", seed],
              [ft / "report.json", best], threads, f_steps,
              collect=lambda: trained(ft, f_steps, lambda r: r["best"]["top1"])),
        Stage("eval_after", evaluate(best), [out / "eval_after.json"],
              json_out=out / "eval_after.json", collect=lambda: evaluated(out / "eval_after.json")),
        Stage("inspect", [*py, "-m", "vit", "inspect", _shown(best), "--images",
                          _shown(out / "shards" / "dataset.json"), "--out", _shown(out / "inspect")],
              [out / "inspect" / "inspect.json"]),
    ]


def _env(stage: Stage) -> dict[str, str]:
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, **stage.env, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "PYTHONUNBUFFERED": "1"}  # log lines arrive as they are written: the progress bar follows them


def shown_command(stage: Stage) -> str:
    """The stage's command as one copyable shell line (run from the repo root)."""
    return shlex.join([*(f"{k}={v}" for k, v in stage.env.items()), *stage.argv])


def _stream(stage: Stage, log_path: Path) -> tuple[int, list[str]]:
    """Run a training or eval stage with its output in `log_path`; a training's log lines and a progress bar
    over its steps go to the console. Returns the exit code and the lines of stdout."""
    bar = tqdm(total=stage.steps, desc=stage.name, unit="step", dynamic_ncols=True) if stage.steps else None
    lines = []
    with open(log_path, "w", buffering=1) as log:
        with subprocess.Popen(stage.argv, cwd=ROOT, env=_env(stage), stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.STDOUT if bar else log) as proc:
            for line in proc.stdout:
                log.write(line)
                lines.append(line.rstrip("\n"))
                if bar is not None and OUR_LOG_LINE.match(line):  # DeepSpeed's and torch's notices stay in the log
                    bar.write(lines[-1])
                    if m := STEP_LINE.search(line):
                        bar.update(int(m[1]) - bar.n)
    if bar is not None:
        bar.close()
    return proc.returncode, lines


def run_stage(stage: Stage, logs: Path) -> None:
    """Run one stage; on failure show the end of its output and stop the demo with the log's path."""
    print(f"\n== {stage.name}\n$ {shown_command(stage)}{stage.note and chr(10) + stage.note}", flush=True)
    if stage.steps is None and stage.json_out is None:  # data_prep: its own output and progress bars
        rc, log = subprocess.run(stage.argv, cwd=ROOT, env=_env(stage)).returncode, None
    else:
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{stage.name}.log"
        rc, lines = _stream(stage, log)
        if rc == 0 and stage.json_out is not None:
            result = json.loads(lines[-1])  # the CLI's last line
            atomic_write_json(stage.json_out, result)
            print(f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%} on {result['samples']} "
                  f"{result['split']} images at {result['image_size'][0]} px")
    if rc != 0:
        if log is not None:
            print("\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
        where = f"; full output in {_shown(log)}" if log else ""
        raise SystemExit(f"demo: stage {stage.name} failed (exit {rc}){where}. Fix the cause and run the demo "
                         "again: finished stages are kept.")


def _load_state(out: Path, options: dict) -> dict:
    path = out / "demo.json"
    state = _read_json(path) if path.exists() else {"options": options, "stages": {}}
    state["options"].setdefault("seed", 0)  # a demo made before --seed existed ran seed 0
    if state["options"] != options:
        raise SystemExit(f"demo: {_shown(out)} holds a demo made with {state['options']}, not {options}: "
                         "delete it or pass another --out")
    return state


def summarize(state: dict, out: Path, wall_s: float, reused: set[str]) -> dict:
    """The numbers of the final table (also written to OUT/summary.json)."""
    stages = state["stages"]
    splits = _read_json(out / "shards" / "dataset.json")["splits"]
    rows = {}
    for name, rec in stages.items():
        rate = rec.get("img_per_s") or (rec["images"] / rec["seconds"] if rec.get("images") else None)
        rows[name] = {"seconds": rec["seconds"], "img_per_s": rate, "reused": name in reused}
    return {
        "samples": {k: v["samples"] for k, v in splits.items()},
        "shards": {k: len(v["shards"]) for k, v in splits.items()},
        "pretrain_top1": stages["pretrain"]["top1"], "top1_before": stages["eval_before"]["top1"],
        "top1_after": stages["eval_after"]["top1"], "stages": rows, "wall_s": wall_s,
        "fewshot_before": stages["pretrain"].get("fewshot_before"), "fewshot_after": stages["pretrain"].get(
            "fewshot_after"), "inspect": sorted(_shown(p) for p in (out / "inspect").glob("*.png")),
        "tensorboard_logdir": _shown(out),
        "tensorboard": [_shown(out / "pretrain" / "tb"), _shown(out / "finetune" / "tb")],
        "weights": {"pretrained": _shown(out / "pretrain" / "export" / "model.safetensors"),
                    "finetuned": _shown(out / "finetune" / "best.safetensors")},
        "previews": sorted(_shown(p) for p in out.glob("preview_*.png")),
    }


def table(s: dict, args: argparse.Namespace) -> str:
    """The final report as text."""
    results = [
        (f"pre-train at {PRETRAIN_PX} px: ViT debug (patch 8), {args.pretrain_steps} steps x {GLOBAL_BATCH}, "
         f"{args.nproc} processes, ZeRO-2 bf16", s["pretrain_top1"]),
        (f"same weights at {FINETUNE_PX} px: pos-embed interpolated 4x4 -> 8x8, no training", s["top1_before"]),
        (f"fine-tuned at {FINETUNE_PX} px: {args.finetune_steps} steps x {GLOBAL_BATCH}, Accelerate, "
         f"{args.nproc} processes", s["top1_after"]),
    ]
    lines = ["", "=" * 100, f"vitscale demo: {sum(s['samples'].values())} real digits (scikit-learn's 8x8, upscaled "
             f"to {FINETUNE_PX} px), " + ", ".join(f"{s['samples'][k]} {k} samples in {s['shards'][k]} shards"
                                               for k in s["samples"]), "",
             f"  {'':<84}{'val top-1':>10}"]
    lines += [f"  {text:<84}{top1:>10.1%}" for text, top1 in results]
    lines += [f"  {'(chance)':<84}{0.1:>10.1%}"]
    if s["fewshot_before"] and s["fewshot_after"]:  # few-shot linear eval of the pre-training run (ridge, 3 seeds)
        lines += ["", f"  {'few-shot linear top-1 on the digits val split (frozen features, ridge, 3 seeds)':<84}"
                  f"{'before':>10}{'after':>8}"]
        lines += [f"  {f'  {k[:-4]}-shot, pre-training at {PRETRAIN_PX} px':<84}{s['fewshot_before'][k]:>10.1%}"
                  f"{s['fewshot_after'][k]:>8.1%}" for k in s["fewshot_after"]]
    lines += ["", f"  {'stage':<14}{'seconds':>9}{'images/s':>11}"]
    for name, r in s["stages"].items():
        rate = f"{r['img_per_s']:11.0f}" if r["img_per_s"] else f"{'':>11}"
        lines.append(f"  {name:<14}{r['seconds']:9.1f}{rate}{'   (reused)' if r['reused'] else ''}")
    lines += [
        f"  {'all stages':<14}{sum(r['seconds'] for r in s['stages'].values()):9.1f}",
        f"  wall time of this run: {s['wall_s']:.1f} s ({s['wall_s'] / 60:.1f} min)",
        "  images/s: training = the trainer's own meter (median over its log windows, all processes);",
        "            other stages = images / stage time, start-up included", "",
        f"  TensorBoard  {shlex.join(['tensorboard', '--logdir', s['tensorboard_logdir']])}   "
        f"({', '.join(s['tensorboard'])})",
        f"  weights      {s['weights']['pretrained']} (pre-trained, {PRETRAIN_PX} px)",
        f"               {s['weights']['finetuned']} (fine-tuned, {FINETUNE_PX} px)",
        f"  previews     {', '.join(s['previews'])}",
        f"  inspect      {', '.join(s['inspect'])}", "=" * 100,
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="everything goes here (relative to the current folder)")
    p.add_argument("--pretrain-steps", type=int, default=500, help=f"optimizer steps of {GLOBAL_BATCH} images")
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0, help="run.seed of both trainers (initialisation, data order)")
    p.add_argument("--nproc", type=int, default=None, help="processes per stage (default: the GPUs, else 2)")
    p.add_argument("--no-photos", dest="photos", action="store_false", help="skip the sample-photo preview")
    args = p.parse_args(argv)
    import torch

    args.cpu = not torch.cuda.is_available()
    args.nproc = args.nproc or torch.cuda.device_count() or 2
    if GLOBAL_BATCH % args.nproc:
        p.error(f"--nproc must divide the global batch of {GLOBAL_BATCH}")
    return args


def main(argv: list[str] | None = None) -> int:
    t0 = time.perf_counter()
    args = parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, {"pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
                              "seed": args.seed})
    print(f"vitscale demo into {_shown(out)}; commands run from {ROOT}")
    reused = set()
    for stage in data_stages(out, args.photos) + model_stages(out, args):
        if stage.name in state["stages"] and all(p.exists() for p in stage.outputs):
            print(f"== {stage.name}: done in an earlier run, reused")
            reused.add(stage.name)
            continue
        start = time.perf_counter()
        run_stage(stage, out / "logs")
        state["stages"][stage.name] = {"command": shown_command(stage), "seconds": time.perf_counter() - start,
                                       **stage.collect()}
        atomic_write_json(out / "demo.json", state)
    summary = summarize(state, out, time.perf_counter() - t0, reused)
    atomic_write_json(out / "summary.json", summary)
    print(table(summary, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
