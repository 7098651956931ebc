"""`export --format hf|timm-dir` writes a Hugging Face model card (README.md) from the checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from finetune.config import load_finetune_config
from runtime.config import to_dict
from tests.stage_fixtures import accelerate_run_dir
from trainer.export import export
from trainer.model_card import model_card
from vit import VisionTransformer, vit_config
from vit.weights import EvalSettings

NAMES = ["cat", "dog", "fox"]


def _run(tmp_path: Path, evals: list[dict]) -> Path:
    """A fine-tuning run dir at step 7 whose state holds `evals` (of EMA weights) and its resolved config."""
    torch.manual_seed(0)
    cfg = vit_config("debug", image_size=(16, 24), num_classes=3)
    run = accelerate_run_dir(tmp_path / "run", VisionTransformer(cfg).state_dict(), cfg, NAMES)
    state_file = run / "checkpoints" / "global_step7" / "trainer_state.json"
    config = load_finetune_config("debug_cpu", ["init=pre/model.safetensors", "data.path=shards/pets/dataset.json",
                                                f"run.dir={run}", "train.ema_decay=0.99", "data.interpolation=bicubic"])
    state = json.loads(state_file.read_text())
    state.update(evals=evals, evaluated_ema=True, config=to_dict(config), eval_settings={
        "image_size": [16, 24], "crop_pct": 0.875, "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3})
    state_file.write_text(json.dumps(state))
    return run


@pytest.mark.parametrize("fmt, library", [("timm-dir", "timm"), ("hf", "transformers")])
def test_folder_exports_carry_a_model_card_the_hub_reads(tmp_path: Path, fmt: str, library: str) -> None:
    evals = [{"step": 5, "top1": 0.5, "top5": 0.9, "loss": 1.0, "samples": 120, "epoch": 1, "raw_top1": 0.45},
             {"step": 7, "top1": 0.625, "top5": 1.0, "loss": 0.8, "samples": 120, "epoch": 2, "raw_top1": 0.6}]
    folder = export(_run(tmp_path, evals), fmt=fmt)
    card = ModelCard.load(folder / "README.md")  # huggingface_hub's own parser: the Hub reads what it reads
    assert (card.data.library_name, card.data.pipeline_tag) == (library, "image-classification")
    assert "vitscale" in card.data.tags
    text = card.text
    assert "fine-tuned from `pre/model.safetensors`" in text
    assert "7 optimizer steps on `shards/pets/dataset.json`" in text
    assert "| 7 | 62.50% | 100.00% | 120 | EMA |" in text and "| 7 | 60.00% | | 120 | model (raw) |" in text
    assert "These weights: step 7, the model weights" in text  # exported without --ema: the raw row is theirs
    assert "cover 18x27 px (bicubic), centre crop 16x24" in text and "mean [0.5, 0.5, 0.5]" in text
    assert "| `optim.name` | `sgd` |" in text and "| `train.ema_decay` | `0.99` |" in text
    assert ("local-dir:PATH" if fmt == "timm-dir" else 'pipeline("image-classification"') in text


def test_a_run_without_evals_says_so_and_an_ema_export_names_its_weights(tmp_path: Path) -> None:
    cfg = vit_config("debug", image_size=16, num_classes=3)
    state = {"step": 3, "evals": [], "class_names": NAMES, "config": {}}
    text = model_card("hf", cfg, state, EvalSettings(16))
    assert "No evaluation had run by this checkpoint" in text and "pre-trained from scratch" in text
    assert text.splitlines()[9] == "# ViT at 16x16 px, 3 classes"  # the debug shape: no paper variant
    large = vit_config("L/16", image_size=384, num_classes=3)  # a paper variant's shape is named
    assert "# ViT-L/16 at 384x384 px, 3 classes" in model_card("hf", large, state, EvalSettings(384))
    evals = [{"step": 3, "top1": 0.5, "top5": 1.0, "samples": 10}]
    assert "the EMA weights" in model_card("timm-dir", cfg, {**state, "evals": evals}, EvalSettings(16), ema=True)
