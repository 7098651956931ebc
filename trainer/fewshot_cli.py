"""`fewshot` and `linear-probe` verbs: the few-shot evaluator of trainer/fewshot.py on any weight file.

    python -m finetune fewshot WEIGHTS data.path=DATASET [shots=1,5,10] [seeds=3] [out=F.json]
    python -m finetune linear-probe WEIGHTS data.path=DATASET [out=F.json]
    torchrun --nproc_per_node 2 -m finetune fewshot ...      (features sharded over ranks; same result)

The weights are evaluated as their run evaluated them (image size, crop, normalisation, precision: the file's
eval settings, as `eval`). A table goes to stdout, the full result (per seed, chosen l2) to a JSON file.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from runtime.config import ConfigError, from_dict
from runtime.dist import detect, init_distributed
from runtime.io import atomic_write_json, output_problem
from runtime.progress import progress_bar
from trainer.config import DataCfg, FewShotCfg, check_split, fewshot_dataset_problems, validate_fewshot
from trainer.evaluate import DTYPES, EVAL_OPTIONS, overridden, settings_used, verb_options
from trainer.fewshot import dataset_features, dataset_name, fewshot_top1, linear_probe_top1

# key -> (type, default) besides data.<key>; shots and l2 also as comma lists (shots=1,5,10)
OPTIONS = {"shots": (list[int] | None, None), "seeds": (int | None, None), "holdout": (int | None, None),
           "l2": (list[float] | None, None), "out": (str | None, None),
           **{k: EVAL_OPTIONS[k] for k in ("model.image_size", "eval.micro_batch", "eval.precision", "data.crop_pct",
                                             "data.interpolation")}}


def _as_list(text: str) -> str:
    """`shots=1,5,10` -> `shots=[1,5,10]` (and `shots=5` -> `shots=[5]`) for the list-valued options."""
    key, _, value = text.partition("=")
    return f"{key}=[{value}]" if key.strip() in ("shots", "l2") and not value.strip().startswith("[") else text


def _options(overrides: list[str], verb: str) -> tuple[DataCfg, FewShotCfg, dict]:
    """(data section, few-shot settings, other options) from `key=value`; bad input is a ConfigError."""
    data, opts = verb_options([_as_list(o) for o in overrides], OPTIONS, verb, workers=2)
    fs = {k: opts.pop(k) for k in ("shots", "seeds", "holdout", "l2") if opts[k] is not None}
    try:
        fs = from_dict(FewShotCfg, {**fs, "datasets": [data.path], "train_split": data.train_split,
                                    "val_split": data.val_split or "val"}, "fewshot")
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad few-shot option: {err}") from err
    if problems := validate_fewshot(fs, prefix="") + fewshot_dataset_problems(fs, key="data.path", prefix=""):
        raise ConfigError("; ".join(problems))
    for k in ("shots", "seeds", "holdout", "l2"):
        opts.pop(k, None)
    return data, fs, opts


def _features(weights: str, data: DataCfg, fs: FewShotCfg, o: dict) -> tuple[dict, int, dict]:
    """({split: (features, labels)}, classes, eval settings used) of the weight file on both splits."""
    from trainer.export import load_eval_model

    model, settings = load_eval_model(weights, o["model.image_size"])
    data, settings = overridden(settings, data, o)
    precision = settings.precision
    env = detect()
    for key, split in (("data.train_split", fs.train_split), ("data.val_split", fs.val_split)):
        check_split(data, split, train=False, micro_batch=o["eval.micro_batch"], world=env.world_size, key=key)
    env = init_distributed(env)
    dev = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    amp = precision.startswith("amp_")
    dtype = DTYPES[precision.removeprefix("amp_")]
    model.to(dev, dtype=torch.float32 if amp else dtype)
    context = (lambda: torch.autocast(dev.type, dtype=dtype)) if amp else contextlib.nullcontext
    feats, n = dataset_features(model, model.head, data, (fs.train_split, fs.val_split), env, model.cfg.image_hw,
                                o["eval.micro_batch"], dev, torch.float32 if amp else dtype, context,
                                (settings.mean, settings.std),
                                progress=lambda desc, total: progress_bar(total=total, desc=desc, unit="batch"))
    return feats, n, {**settings_used(settings), "is_main": env.is_main}


def fewshot_verb(weights: str, overrides: list[str], probe: bool = False) -> dict:
    """`fewshot` (probe=False) or `linear-probe`: print a table, write the JSON, return the result."""
    data, fs, o = _options(overrides, "linear-probe" if probe else "fewshot")
    out = Path(o["out"] or Path(weights).with_suffix("").as_posix() + f".{'probe' if probe else 'fewshot'}.json")
    if why := output_problem(out, "out="):  # before minutes of feature extraction
        raise ConfigError(why)
    feats, n, info = _features(weights, data, fs, o)
    train, val = feats[fs.train_split], feats[fs.val_split]
    name = dataset_name(data.path)
    result = {"weights": str(weights), "dataset": name, "classes": n, "train_samples": len(train[1]),
              "val_samples": len(val[1]), **{k: v for k, v in info.items() if k != "is_main"}}
    if probe:
        result["linear_probe"] = linear_probe_top1(train, val, n, fs.l2)
        rows = [("linear probe (all train)", result["linear_probe"]["top1"])]
    else:
        res = fewshot_top1(train, val, n, fs.shots, fs.seeds, fs.holdout, fs.l2)
        result.update(seeds=fs.seeds, holdout=fs.holdout, fewshot={f"{k}shot": r for k, r in res.items()})
        rows = [(f"{k}-shot", r["top1"]) for k, r in res.items()]
    if info["is_main"]:
        atomic_write_json(out, result)
        print(f"{name}: {n} classes, {result['train_samples']} train / {result['val_samples']} val images at "
              f"{info['image_size'][0]}x{info['image_size'][1]} px")
        print("\n".join(f"  {label:<26}{top1:>8.2%}" for label, top1 in rows))
        print(json.dumps({"top1": {label: top1 for label, top1 in rows}, "json": str(out)}))
    return result
