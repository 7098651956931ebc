"""The job after `--`, read before anything starts: a vitscale training command's recipe, and the facts that
preflight checks (dataset, split, loader workers, global and micro batch) with where each one came from.

`python -m pretrain train RECIPE k=v ...` and `python -m finetune train ...` (any Python interpreter, `-u`
allowed) are loaded here with the stage's own config loader, so a typo'd recipe or override fails in the
launcher with the stage's one-line message, before a run dir, batch script or process exists. Any other
command is passed through unchecked. Loading a config imports no torch (`runtime` and `data_prep` load their
torch-bound names on first use), so this costs a fraction of a second; tests/test_launch.py keeps it so.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, fields

from launch.commands import Job, LaunchError

# stage module -> (its config module, its public loader: recipe name or path + overrides -> validated config)
# `train`'s own options (trainer/cli.py): not overrides, and they change nothing the launcher checks.
TRAIN_FLAGS = ("--allow-changed",)
STAGE_LOADERS = {"pretrain": ("pretrain.config", "load_pretrain_config"),
                 "finetune": ("finetune.config", "load_finetune_config")}


@dataclass(frozen=True)
class Fact:
    """One value preflight checks and where it came from (`--dataset`, `data.path` of the job's config, ...)."""

    value: object
    source: str


@dataclass(frozen=True)
class JobFacts:
    """What preflight checks about the job itself; None where neither the job's config nor a flag gives it."""

    dataset: Fact | None = None
    split: Fact | None = None
    workers: Fact | None = None
    global_batch: Fact | None = None
    micro_batch: Fact | None = None
    resampled: Fact | None = None

    def value(self, name: str, default: object = None) -> object:
        fact = getattr(self, name)
        return default if fact is None else fact.value

    def describe(self) -> str:
        """`dataset=X (data.path), workers=8 (--workers), ...`: each fact given, with its source."""
        return ", ".join(f"{f.name}={fact.value} ({fact.source})" for f in fields(self)
                         if (fact := getattr(self, f.name)) is not None)


def stage_train(job: Job) -> tuple[str, str, list[str]] | None:
    """(stage, recipe, overrides) when `job` is `python -m pretrain|finetune train RECIPE [k=v ...]`, else None."""
    if job.kind != "module" or job.target not in STAGE_LOADERS or job.args[:1] != ("train",):
        return None
    rest = [a for a in job.args[1:] if a not in TRAIN_FLAGS]
    if unknown := [a for a in rest if a.startswith("-")]:
        verb = " ".join(["python -m", job.target, "train", *(a for a in rest[:1] if not a.startswith("-"))])
        raise LaunchError(f"{verb}: unknown option {unknown[0]} (its options: {', '.join(TRAIN_FLAGS)})")
    if not rest:
        raise LaunchError(f"python -m {job.target} train needs a recipe: python -m {job.target} train RECIPE "
                          "[key.sub=value ...]")
    return job.target, rest[0], rest[1:]


def load_job_config(job: Job) -> object | None:
    """The job's validated config when it is a vitscale training command (None for any other command).

    A recipe or override the stage would refuse raises LaunchError with the stage's own one-line message.
    """
    found = stage_train(job)
    if found is None:
        return None
    stage, recipe, overrides = found
    from runtime.config import ConfigError

    module, loader = STAGE_LOADERS[stage]
    try:
        return getattr(importlib.import_module(module), loader)(recipe, overrides)
    except ConfigError as err:
        raise LaunchError(f"python -m {stage} train {recipe}: {err}") from None


def job_facts(cfg: object | None, args: argparse.Namespace) -> JobFacts:
    """The facts preflight checks: an explicit flag (--dataset, --split, --workers, --global-batch,
    --micro-batch) wins over the job's config (`cfg`, None for a command that is not a vitscale verb)."""
    from_cfg = {}
    if cfg is not None:
        data, train = cfg.data, cfg.train
        from_cfg = {"dataset": Fact(data.path, "data.path"), "split": Fact(data.train_split, "data.train_split"),
                    "workers": Fact(data.workers, "data.workers"),
                    "global_batch": Fact(train.global_batch, "train.global_batch"),
                    "micro_batch": Fact(train.micro_batch, "train.micro_batch")}
        if data.resampled:  # every reader draws shards with replacement: no shard count to meet
            from_cfg["resampled"] = Fact(True, "data.resampled")
    flags = {"dataset": "--dataset", "split": "--split", "workers": "--workers", "global_batch": "--global-batch",
             "micro_batch": "--micro-batch"}
    out = dict(from_cfg)
    for name, flag in flags.items():
        value = getattr(args, name, None)
        if value is not None:
            out[name] = Fact(value, flag)
    return JobFacts(**out)

