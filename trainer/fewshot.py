"""Few-shot linear evaluation (the ViT paper's §4.1, big_vision's `fewshot_lsr`), in training and as verbs.

Frozen pre-logit features (the input of the model's `head`, captured by a forward hook, so the forward is the
backend's own: a DeepSpeed engine under ZeRO-3 gathers its weights as usual) are extracted for the whole
train and val splits of a downstream dataset with the eval stream (written order, sharded over ranks, padded
with label -1 so that every rank runs the same number of forwards), gathered on every rank and sorted by
sample key, so the result does not depend on the world size.

Per seed s, each class's train indices are permuted with `default_rng(s)`; a k-shot fit uses the first k,
and the next `holdout` choose the regulariser: for every l2 of the grid, the ridge fitted on the k shots is
scored on the held-out images, and the best (ties: the largest) is kept. The fit is big_vision's: features
whitened with the fit's mean/std, one-hot targets in {-1, 1}, closed-form ridge for all l2 at once from one
eigendecomposition, with an unregularised bias (here exact, by centring; big_vision appends a large constant).
Top-1 is measured on the whole val split and averaged over the seeds. The sample is nested over shot counts.

Why whole splits and not only the sampled images: downstream few-shot datasets are small (big_vision's are
2k-50k images), the stream reads a split only in order, and one pass serves every seed and shot count.
The cost is measured by bench/fewshot_cost.py (README "Watching a run").
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from data_prep.stream import DataCfg, build_loader, normalize
from runtime.dist import DistEnv, all_gather_objects
from runtime.progress import LogProgress
from trainer.config import FewShotCfg

DEFAULT_L2 = FewShotCfg().l2


# ---- ridge regression ---------------------------------------------------------------------------------------
def ridge_fit(x: torch.Tensor, y: torch.Tensor, l2s: Sequence[float]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Ridge regression `min |x w + b - y|^2 + l2 |w|^2` (b unregularised) for every l2 of `l2s` at once.

    x (n, d), y (n, c), in float64. One eigendecomposition of the smaller Gram matrix serves every l2:
    (x'x + l2 I)^-1 x'y when n >= d, else x' (x x' + l2 I)^-1 y, with x, y centred (the exact intercept).
    Returns [(w (d, c), b (c,))] in the order of `l2s`; equals scikit-learn's Ridge(alpha=l2).
    """
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym  # (n, d), (n, c)
    if xc.shape[0] >= xc.shape[1]:
        eigs, q = torch.linalg.eigh(xc.T @ xc)  # (d,), (d, d)
        lhs, rhs = q, q.T @ (xc.T @ yc)  # (d, d), (d, c)
    else:
        eigs, q = torch.linalg.eigh(xc @ xc.T)  # (n,), (n, n)
        lhs, rhs = xc.T @ q, q.T @ yc  # (d, n), (n, c)
    out = []
    for l2 in l2s:
        w = (lhs / (eigs.clamp(min=0) + l2)) @ rhs  # (d, c)
        out.append((w, ym - xm @ w))
    return out


def _targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return 2.0 * torch.nn.functional.one_hot(labels, num_classes).double() - 1.0  # (n, C) in {-1, 1}


class RidgeFits:
    """Ridge classifiers for every l2 of a grid, fitted on whitened features (big_vision's fewshot_lsr)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, l2s: Sequence[float]):
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False) + 1e-5  # whitening, as big_vision
        self.fits = ridge_fit((x - self.mean) / self.std, _targets(y, num_classes), l2s)

    def top1(self, x: torch.Tensor, y: torch.Tensor, which: Sequence[int] | None = None) -> np.ndarray:
        """Top-1 on (x, y) of each fit (or of the fits `which`)."""
        xw = (x - self.mean) / self.std  # (m, d)
        fits = self.fits if which is None else [self.fits[i] for i in which]
        return np.array([((xw @ w + b).argmax(1) == y).double().mean().item() for w, b in fits])


def choose_l2(scores: np.ndarray, l2s: Sequence[float]) -> int:
    """Index of the best held-out top-1; ties go to the largest l2 (the safer side with few images)."""
    best = scores.max()
    return max((i for i, s in enumerate(scores) if s == best), key=lambda i: l2s[i])


def fewshot_top1(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, shots: Sequence[int], seeds: int, holdout: int,
                 l2s: Sequence[float] = DEFAULT_L2) -> dict[int, dict]:
    """{k: {"top1": mean over seeds, "top1_per_seed": [...], "l2": [chosen per seed]}} from features.

    train/val = (features (n, d), labels (n,)); the features are cast to float64.
    """
    tx, ty = train[0].double(), train[1].long()
    vx, vy = val[0].double(), val[1].long()
    classes = [c for c in range(num_classes) if (ty == c).any()]
    out: dict[int, dict] = {k: {"top1_per_seed": [], "l2": []} for k in shots}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(np.flatnonzero(ty.numpy() == c)) for c in classes]  # fixed per seed: nested shots
        for k in shots:
            fit = torch.from_numpy(np.concatenate([p[:k] for p in perms]))
            held = torch.from_numpy(np.concatenate([p[k:k + holdout] for p in perms]))
            fits = RidgeFits(tx[fit], ty[fit], num_classes, l2s)
            # no image left to hold out: the strongest regulariser
            i = choose_l2(fits.top1(tx[held], ty[held]), l2s) if len(held) else len(l2s) - 1
            top1 = fits.top1(vx, vy, [i])
            out[k]["top1_per_seed"].append(float(top1[0]))
            out[k]["l2"].append(l2s[i])
    for r in out.values():
        r["top1"] = float(np.mean(r["top1_per_seed"]))
    return out


def linear_probe_top1(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                      num_classes: int, l2s: Sequence[float] = DEFAULT_L2, holdout_share: float = 0.1,
                      seed: int = 0) -> dict:
    """Ridge on the whole train split: l2 chosen on a seeded `holdout_share` of it, refitted on all of it."""
    tx, ty = train[0].double(), train[1].long()
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(ty)))
    n_held = max(1, int(len(ty) * holdout_share))
    held, fit = perm[:n_held], perm[n_held:]
    i = choose_l2(RidgeFits(tx[fit], ty[fit], num_classes, l2s).top1(tx[held], ty[held]), l2s)
    top1 = RidgeFits(tx, ty, num_classes, [l2s[i]]).top1(val[0].double(), val[1].long())
    return {"top1": float(top1[0]), "l2": l2s[i], "train_samples": len(ty), "val_samples": len(val[1])}


# ---- features -----------------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features(model: nn.Module, head: nn.Module, loader, device: torch.device,
                     input_dtype: torch.dtype = torch.float32,
                     context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     mean_std: tuple | None = None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, d) float32, labels (n,)) of every labelled sample of an eval stream (`with_keys=True`),
    gathered from all ranks and sorted by key (every rank must call it: under ZeRO-3 a forward is a collective).

    The features are the input of `head` (the pre-logits), captured by a hook during `model`'s own forward.
    `progress` (runtime.progress: a bar or LogProgress) is advanced by one batch and its images per forward.
    """
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    was_training = model.training
    model.eval()
    norm = dict(zip(("mean", "std"), mean_std, strict=True)) if mean_std else {}
    feats, labels, keys = [], [], []
    try:
        for images, y, k in loader:
            x = normalize(images, dtype=torch.float32, device=device, **norm).to(input_dtype)  # (B, 3, H, W)
            with context():
                model(x)
            f = captured.pop().float().cpu()  # (B, d)
            valid = y >= 0  # label -1: the stream's padding
            feats.append(f[valid])
            labels.append(y[valid])
            keys += [key for key, v in zip(k, valid.tolist(), strict=True) if v]
            if progress is not None:
                progress.update(1, items=len(x))
    finally:
        hook.remove()
        model.train(was_training)
    mine = (keys, torch.cat(feats).numpy(), torch.cat(labels).numpy())
    parts = all_gather_objects(mine)
    all_keys = [key for p in parts for key in p[0]]
    order = sorted(range(len(all_keys)), key=all_keys.__getitem__)  # the world size does not change the order
    f = torch.from_numpy(np.concatenate([p[1] for p in parts]))[order]
    y = torch.from_numpy(np.concatenate([p[2] for p in parts]))[order]
    return f, y


def dataset_name(path: str) -> str:
    """A dataset's name in tags and tables: its folder's name."""
    p = Path(path)
    return (p if p.is_dir() else p.parent).name or str(path)


def dataset_features(model: nn.Module, head: nn.Module, data: DataCfg, splits: tuple[str, str], env: DistEnv,
                     image_size: tuple[int, int], micro_batch: int, device: torch.device,
                     input_dtype: torch.dtype, context, mean_std: tuple | None = None,
                     progress: Callable[[str, int], Any] | None = None) -> tuple[dict, int]:
    """({split: (features, labels)}, number of classes) of a dataset's train and val splits.
    `progress(desc, batches)`, if given, makes each split's progress (a bar or LogProgress; None: none)."""
    out, num_classes = {}, 0
    for split in splits:
        loader = build_loader(data, split, train=False, dist_env=env, image_size=image_size,
                              micro_batch=micro_batch, seed=0, device=device, with_keys=True)
        prog = progress(f"features {dataset_name(data.path)}/{split}", len(loader)) if progress else None
        try:
            out[split] = extract_features(model, head, loader, device, input_dtype, context, mean_std, prog)
            num_classes = max(num_classes, loader.num_classes or int(out[split][1].max()) + 1)
        finally:
            loader.close()
            if prog is not None:
                prog.close()
    return out, num_classes


class FewShotEval:
    """The training loop's few-shot eval: every configured dataset, logged as `fewshot/<dataset>/<k>shot`."""

    def __init__(self, cfg, env: DistEnv, image_size: tuple[int, int], monitor, interpolation: str):
        self.f: FewShotCfg = cfg.eval.fewshot
        self.env, self.image_size, self.monitor = env, image_size, monitor
        self.progress_every_s = cfg.log.progress_every_s
        self.micro_batch = cfg.eval.micro_batch or cfg.train.micro_batch
        # the run's own eval preprocessing (its resize filter: trainer/run.py's `inputs`) and workers (decoding is
        # the cost the GPU waits for; the loaders live only for the duration of one eval)
        self.data = [dataclasses.replace(cfg.data, path=p, num_classes=None, shard_root=None,
                                         interpolation=interpolation) for p in self.f.datasets]

    def _log_progress(self, desc: str, total: int) -> LogProgress | None:
        """Few-shot feature extraction in the run's log, ~every 10 % (rank 0)."""
        return LogProgress(total, f"few-shot {desc}", ranks=self.env.world_size,
                           min_interval=self.progress_every_s) if self.env.is_main else None

    def run(self, backend, step: int, norm: tuple) -> dict:
        """{dataset: {k: top-1 result}} of the backend's current weights, on inputs normalised with `norm` (mean,
        std), as the run trains (every rank must call it)."""
        t0, results = time.perf_counter(), {}
        for data in self.data:
            feats, n = dataset_features(backend.eval_model(), backend.module.head, data,
                                        (self.f.train_split, self.f.val_split), self.env, self.image_size,
                                        self.micro_batch, backend.device, backend.input_dtype, backend.eval_context,
                                        norm, progress=self._log_progress)
            results[dataset_name(data.path)] = fewshot_top1(feats[self.f.train_split], feats[self.f.val_split], n,
                                                            self.f.shots, self.f.seeds, self.f.holdout, self.f.l2)
        self.monitor.log_fewshot(results, step, time.perf_counter() - t0)
        return {name: {f"{k}shot": r["top1"] for k, r in res.items()} for name, res in results.items()}
