"""Config loading: recipe -> dataclasses, overrides, type checks and helpful errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from runtime.config import ConfigError, config_hash, load_config, save_config, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0


@dataclass
class Train:
    steps: int | None = None
    global_batch: int = 4096
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    optim: Optim = field(default_factory=Optim)


@dataclass
class Recipe:
    name: str = "x"
    train: Train = field(default_factory=Train)
    tags: list[str] = field(default_factory=list)


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    (tmp_path / "vit_tiny.yaml").write_text(
        yaml.safe_dump({"name": "tiny", "train": {"steps": 10, "optim": {"lr": "1e-4"}}})
    )
    return tmp_path


def test_recipe_loads_by_name_and_path(recipes: Path) -> None:
    cfg = load_config(Recipe, "vit_tiny", recipes_dir=recipes)
    assert cfg.name == "tiny" and cfg.train.steps == 10 and cfg.train.optim.lr == 1e-4
    assert cfg.train.global_batch == 4096  # untouched default
    assert load_config(Recipe, recipes / "vit_tiny.yaml", recipes_dir=recipes) == cfg


def test_overrides_change_values(recipes: Path) -> None:
    cfg = load_config(Recipe, "vit_tiny", ["train.optim.lr=3e-3", "train.steps=null", "tags=[a, b]",
                                           "train.optim.betas=[0.9, 0.95]", "train.precision=fp16"],
                      recipes_dir=recipes)
    assert cfg.train.optim.lr == 3e-3 and cfg.train.steps is None and cfg.tags == ["a", "b"]
    assert cfg.train.optim.betas == (0.9, 0.95) and cfg.train.precision == "fp16"


def test_unknown_key_lists_close_matches(recipes: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train.global_bach'.*'train.global_batch'"):
        load_config(Recipe, "vit_tiny", ["train.global_bach=8"], recipes_dir=recipes)
    (recipes / "bad.yaml").write_text("train:\n  optim:\n    lrr: 1.0\n")
    with pytest.raises(ConfigError, match=r"'train.optim.lrr'.*'train.optim.lr'"):
        load_config(Recipe, "bad", recipes_dir=recipes)


def test_wrong_types_fail_with_the_key(recipes: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.global_batch must be int, got 'big'"):
        load_config(Recipe, "vit_tiny", ["train.global_batch=big"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match="train.global_batch must be int, got True"):
        load_config(Recipe, "vit_tiny", ["train.global_batch=true"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match="train.precision must be one of 'bf16', 'fp16', 'fp32'"):
        load_config(Recipe, "vit_tiny", ["train.precision=int8"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match="train.optim.betas must have 2 items"):
        load_config(Recipe, "vit_tiny", ["train.optim.betas=[0.9]"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(Recipe, "vit_tiny", ["train.steps.x=1"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(Recipe, "vit_tiny", ["train.steps"], recipes_dir=recipes)


def test_missing_recipe_names_the_choices(recipes: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean vit_tiny"):
        load_config(Recipe, "vit_tiyn", recipes_dir=recipes)


def test_resolved_config_round_trips(recipes: Path, tmp_path: Path) -> None:
    cfg = load_config(Recipe, "vit_tiny", ["train.optim.lr=0.5"], recipes_dir=recipes)
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(Recipe, out)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(Recipe, out, ["train.steps=11"])) != config_hash(cfg)
    assert to_dict(cfg)["train"]["optim"]["betas"] == [0.9, 0.999]
