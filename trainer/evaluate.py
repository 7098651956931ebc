"""The one eval: exact top-1/top-5 over a split, in training and for any weight file (`eval` of both stages).

A weight file carries the settings its run evaluated with (image size, crop_pct, interpolation, mean/std and
the precision: weights cast to bf16 under DeepSpeed, bf16 autocast under Accelerate), so `eval` of a run's
exported or best weights repeats the run's own eval and reports its top-1 exactly. See docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from data_prep.stream import DataCfg, build_loader, normalize
from data_prep.stream_config import data_problems
from runtime.config import ConfigError, check_value, parse_override
from runtime.dist import detect, init_distributed, is_distributed
from runtime.progress import progress_bar
from trainer.config import check_split
from vit.weights import INTERPOLATIONS, PRECISIONS, EvalSettings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    nccl = torch_dist.get_backend() == "nccl"
    on = t.to(torch.device("cuda", torch.cuda.current_device())) if nccl else t.cpu()
    torch_dist.all_reduce(on)
    return on.to(t.device)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, input_dtype: torch.dtype = torch.float32,
             context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             mean_std: tuple | None = None, progress=None) -> dict:
    """Exact top-1/top-5 and mean loss over an eval loader, summed over all ranks (every rank must call it).

    Labels of -1 (the stream's padding that keeps ranks in step) are not counted; the forward still runs,
    since under ZeRO-3 a forward is a collective. `context()` wraps each forward (autocast). `progress`
    (runtime.progress: a bar or LogProgress) is advanced by one batch and its images per forward.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # samples, top-1 hits, top-5 hits, loss sum
    norm = dict(zip(("mean", "std"), mean_std, strict=True)) if mean_std else {}
    for images, labels in loader:
        x = normalize(images, dtype=torch.float32, device=device, **norm).to(input_dtype)  # (B, 3, H, W)
        y = labels.to(device)  # (B,)
        with context():
            logits = model(x).float()  # (B, K)
        valid = y >= 0
        logits, y = logits[valid], y[valid]
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]  # (b, 5)
        loss = F.cross_entropy(logits, y, reduction="sum") if len(y) else logits.sum()
        sums += torch.stack([torch.tensor(float(len(y)), device=device, dtype=torch.float64),
                             hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), loss.double()])
        if progress is not None:
            progress.update(1, items=len(x))
    sums = _all_reduce(sums)
    model.train(was_training)
    n = int(sums[0].item())
    if n == 0:
        raise RuntimeError("the eval split yielded no labelled sample; check the split name and the shards")
    return {"samples": n, "top1": sums[1].item() / n, "top5": sums[2].item() / n, "loss": sums[3].item() / n}


# The eval verbs' options besides `data.<key>`: key -> (type, default), typed as a recipe's keys are. None:
# the weight file's own eval settings.
EVAL_OPTIONS = {"data.split": (str, "val"), "model.image_size": (int | tuple[int, int] | None, None),
                "model.pos_interp": (Literal["bicubic", "bilinear"], "bicubic"), "eval.micro_batch": (int, 64),
                "eval.precision": (Literal[PRECISIONS] | None, None), "data.crop_pct": (float | None, None),
                "data.interpolation": (Literal[INTERPOLATIONS] | None, None)}


def verb_options(overrides: list[str], options: dict[str, tuple[object, object]], verb: str,
                 workers: int = 4) -> tuple[DataCfg, dict]:
    """(data section, the verb's `options`) from `key=value` overrides, for the verbs that evaluate a weight file
    (`verb`: eval, fewshot, linear-probe): each value type-checked, the data section checked as a recipe's is
    (data_problems); an unknown key, a bad value or no data.path is a ConfigError naming it. Without data.workers,
    `workers` loader processes, at most one per usable CPU."""
    from runtime.config import from_dict

    data, opts = {}, {key: default for key, (_, default) in options.items()}
    data_fields = {f.name for f in dataclasses.fields(DataCfg)}
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        if key in options:
            opts[key] = check_value(options[key][0], value, key)
        elif len(keys) == 2 and keys[0] == "data" and keys[1] in data_fields:
            data[keys[1]] = value
        else:
            raise ConfigError(f"unknown {verb} option {key!r} (valid: data.<key> of the data section, "
                              f"{', '.join(k for k in options if not k.startswith('data.'))})")
    if not data.get("path"):
        raise ConfigError(f"data.path is required: {verb} WEIGHTS data.path=DATASET/dataset.json")
    if not Path(data["path"]).exists() and "://" not in data["path"] and "{" not in data["path"]:
        raise ConfigError(f"data.path {data['path']} does not exist; pass a dataset.json written by data_prep")
    data.setdefault("workers", min(workers, len(os.sched_getaffinity(0))))  # not more loader processes than CPUs
    cfg = from_dict(DataCfg, data, "data")
    given = {k: opts[f"data.{k}"] for k in ("crop_pct", "interpolation") if opts.get(f"data.{k}") is not None}
    problems = data_problems(dataclasses.replace(cfg, **given))
    if opts.get("eval.micro_batch", 1) < 1:
        problems.append(f"eval.micro_batch must be >= 1, got {opts['eval.micro_batch']}")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg, opts


def overridden(settings: EvalSettings, data: DataCfg, o: dict) -> tuple[DataCfg, EvalSettings]:
    """The eval settings an eval verb uses: the weight file's `settings`, each replaced where the command line
    gives one (data.crop_pct, data.interpolation, data.mean, data.std, eval.precision); and `data` with that crop
    and filter (both valid: the command line's were checked with the data section, the file's by EvalSettings)."""
    settings = settings.replace(crop_pct=o["data.crop_pct"] or settings.crop_pct, mean=data.mean or settings.mean,
                                std=data.std or settings.std, precision=o["eval.precision"] or settings.precision,
                                interpolation=o.get("data.interpolation") or settings.interpolation)
    return dataclasses.replace(data, crop_pct=settings.crop_pct, interpolation=settings.interpolation), settings


def settings_used(settings: EvalSettings) -> dict:
    """What an eval verb reports of the settings it evaluated with (`overridden`'s), beside its figures."""
    d = settings.to_dict()
    return {k: d[k] for k in ("image_size", "precision", "crop_pct", "interpolation", "mean", "std")}


def evaluate_weights(path: str | Path, overrides: list[str]) -> dict:
    """`eval WEIGHTS data.path=... [key=value ...]`: top-1/top-5 of a weight file (or a run dir's latest
    checkpoint) on a split, with the file's eval settings unless overridden; one process or torchrun.
    A progress bar on rank 0's terminal unless switched off (runtime.progress)."""
    from trainer.export import load_eval_model

    data, o = verb_options(overrides, EVAL_OPTIONS, "eval")
    model, settings = load_eval_model(path, o["model.image_size"], o["model.pos_interp"])
    data, settings = overridden(settings, data, o)
    precision = settings.precision
    env = detect()
    plan = check_split(data, o["data.split"], train=False, micro_batch=o["eval.micro_batch"], world=env.world_size,
                       key="data.split")
    labels = data.num_classes or len(plan.source.classes or ())  # 0: tar URLs without num_classes, labels unknown
    if labels > model.cfg.num_classes:  # a label past the head is an IndexError (a device assert on a GPU)
        raise ConfigError(f"{path} has a head of {model.cfg.num_classes} classes and {data.path} has {labels}: "
                          "evaluate it on the dataset it was trained for, or fine-tune a head for this one "
                          f"(python -m finetune train RECIPE init={path} data.path={data.path} ...)")
    env = init_distributed(env)
    dev = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    amp = precision.startswith("amp_")
    dtype = DTYPES[precision.removeprefix("amp_")]
    model.to(dev, dtype=torch.float32 if amp else dtype)
    loader = build_loader(data, o["data.split"], train=False, dist_env=env, image_size=model.cfg.image_hw,
                          micro_batch=o["eval.micro_batch"], seed=0, device=dev)
    try:
        context = (lambda: torch.autocast(dev.type, dtype=dtype)) if amp else contextlib.nullcontext
        with progress_bar(total=len(loader), desc="eval", unit="batch") as bar:
            m = evaluate(model, loader, dev, torch.float32 if amp else dtype, context, (settings.mean, settings.std),
                         bar)
    finally:
        loader.close()
    m.update(weights=str(path), split=o["data.split"], **settings_used(settings))
    return m
