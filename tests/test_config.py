"""Config loading: recipe -> dataclasses, overrides, type checks and helpful errors."""

from __future__ import annotations

import re
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
    for bad in ("nan", ".nan", "inf", "-.inf", "1e999"):  # NaN passed every `lr >= 0` check and trained to NaN
        with pytest.raises(ConfigError, match=r"^train.optim.lr must be a finite number, got "):
            load_config(Recipe, "vit_tiny", [f"train.optim.lr={bad}"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match=r"^tags must be a list, got 'a,b'; write it as \[a,b\]$"):
        load_config(Recipe, "vit_tiny", ["tags=a,b"], recipes_dir=recipes)
    assert load_config(Recipe, "vit_tiny", ["train.optim.lr=2"], recipes_dir=recipes).train.optim.lr == 2.0


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


# ---- base: inheritance ----------------------------------------------------------------------------------------

def test_base_is_deep_merged_recursively(recipes: Path, tmp_path: Path) -> None:
    (recipes / "mid.yaml").write_text("base: vit_tiny\ntrain: {global_batch: 64, optim: {weight_decay: 0.1}}\n")
    sub = tmp_path / "mine"
    sub.mkdir()
    (sub / "top.yaml").write_text("base: ../mid.yaml\nname: top\ntrain: {optim: {lr: 0.5}}\ntags: [x]\n")
    cfg = load_config(Recipe, sub / "top.yaml", ["train.steps=3"], recipes_dir=recipes)
    assert cfg.name == "top" and cfg.tags == ["x"]  # the recipe over its base
    assert cfg.train.global_batch == 64 and cfg.train.optim.weight_decay == 0.1  # mid's, kept beside top's keys
    assert cfg.train.optim.lr == 0.5 and cfg.train.steps == 3  # top's over vit_tiny's; the override over all
    assert load_config(Recipe, "mid", recipes_dir=recipes).train.steps == 10  # a name in the recipes folder


def test_base_cycle_bad_name_and_unknown_key_in_base_are_one_line(recipes: Path) -> None:
    (recipes / "a.yaml").write_text("base: b\nname: a\n")
    (recipes / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"^recipe base cycle: a.yaml -> b.yaml -> a.yaml; remove") as e:
        load_config(Recipe, "a", recipes_dir=recipes)
    (recipes / "c.yaml").write_text("base: vit_tinny\n")
    with pytest.raises(ConfigError, match=r"c.yaml: base: no recipe 'vit_tinny': did you mean vit_tiny\?"):
        load_config(Recipe, "c", recipes_dir=recipes)
    (recipes / "typo.yaml").write_text("train: {glob_batch: 8}\n")
    (recipes / "d.yaml").write_text("base: typo\nname: d\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown config key 'train.glob_batch'.*'train.global_batch'"):
        load_config(Recipe, "d", recipes_dir=recipes)  # the file the key is in, not the one loaded
    assert "\n" not in str(e.value)


def test_a_key_twice_and_text_that_is_not_utf8_are_one_line_and_a_bom_or_merge_key_reads(recipes: Path) -> None:
    """YAML keeps the last of a key given twice: a recipe with `steps` twice trained with the second, silently.
    A file in another encoding was a UnicodeDecodeError traceback."""
    (recipes / "twice.yaml").write_text("name: t\ntrain:\n  steps: 10\n  global_batch: 8\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"^\S*twice.yaml is not valid plain YAML \(key 'steps' given twice "
                                          r"\(lines 3 and 5\)\)$"):
        load_config(Recipe, "twice", recipes_dir=recipes)
    with pytest.raises(ConfigError, match=r"override 'train.optim' is not valid plain YAML \(key 'lr' given twice"):
        load_config(Recipe, "vit_tiny", ["train.optim={lr: 1, lr: 2}"], recipes_dir=recipes)
    (recipes / "latin1.yaml").write_bytes("name: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 9\); save it as UTF-8"):
        load_config(Recipe, "latin1", recipes_dir=recipes)
    (recipes / "bom.yaml").write_bytes("\ufeffname: café\n".encode())
    assert load_config(Recipe, "bom", recipes_dir=recipes).name == "café"
    (recipes / "merge.yaml").write_text("train:\n  optim: {<<: &o {lr: 0.5, weight_decay: 0.1}, lr: 0.2}\n")
    optim = load_config(Recipe, "merge", recipes_dir=recipes).train.optim  # a merge key overridden: no duplicate
    assert (optim.lr, optim.weight_decay) == (0.2, 0.1)


def test_shipped_recipes_that_extend_another_resolve_as_written_out() -> None:
    """The in21k L/16 and H/14 recipes extend B/16's; their resolved values are the paper's, spelled in full."""
    from pretrain.config import RECIPES_DIR, PretrainConfig

    cfg = load_config(PretrainConfig, "vit_h14_in21k", recipes_dir=RECIPES_DIR)
    assert (cfg.model.variant, cfg.model.representation_size, cfg.train.micro_batch) == ("H/14", 1280, 64)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.epochs, cfg.train.global_batch) == (1e-3, 10000, 90, 4096)
    assert (cfg.model.dropout, cfg.model.compile, cfg.data.workers, cfg.checkpoint.keep) == (0.1, True, 10, 3)


# ---- ${a.b} interpolation -------------------------------------------------------------------------------------

def test_interpolation_keeps_the_type_of_a_whole_reference_and_formats_embedded_ones(recipes: Path) -> None:
    (recipes / "i.yaml").write_text("base: vit_tiny\nname: 'run-${train.steps}-${train.precision}-${tags}'\n"
                                    "train: {global_batch: '${train.steps}'}\n"
                                    "tags: ['${train.precision}', '$${literal}']\n")
    cfg = load_config(Recipe, "i", ["train.optim.weight_decay=${train.optim.lr}"], recipes_dir=recipes)
    assert cfg.train.global_batch == 10 and cfg.train.optim.weight_decay == 1e-4  # whole: int, float (via str)
    # precision is a default; a list formats as JSON, its items resolved first (a reference to a reference)
    assert cfg.name == 'run-10-bf16-["bf16", "${literal}"]'
    assert cfg.tags == ["bf16", "${literal}"]  # `$${` is a literal `${`
    again = load_config(Recipe, save_config(cfg, recipes / "out" / "config.yaml"))
    assert again == cfg  # the saved YAML escapes its `${`: it loads back as the same values


def test_interpolation_errors_are_one_line(recipes: Path) -> None:
    with pytest.raises(ConfigError, match=r"^\$\{train.stepz\} in name: unknown config key 'train.stepz': did you "
                                          r"mean 'train.steps'\?.*\$\$\{ for a literal"):
        load_config(Recipe, "vit_tiny", ["name=x${train.stepz}"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match=r"^interpolation cycle: name -> tags\[0\] -> name; "):
        load_config(Recipe, "vit_tiny", ["name=${tags}", "tags=['${name}']"], recipes_dir=recipes)
    with pytest.raises(ConfigError, match=r"train.global_batch must be int, got 'bf16'"):  # types checked after
        load_config(Recipe, "vit_tiny", ["train.global_batch=${train.precision}"], recipes_dir=recipes)


# ---- the `config` verb ----------------------------------------------------------------------------------------

def _stage_main(stage: str):
    import importlib

    return importlib.import_module(f"{stage}.__main__").main


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_config_verb_prints_every_key_value_type_and_default(stage: str, capsys) -> None:
    from runtime.config_schema import config_fields

    code = _stage_main(stage)(["config", "debug_cpu", "optim.lr=0.5", "run.dir=runs/${optim.name}"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = {line[2:].split()[0]: line for line in out.splitlines()[1:-1]}
    cls = type(load_config_of(stage))
    assert list(rows) == [r["key"] for r in config_fields(cls)]  # every key, in order
    name = {"pretrain": "adamw", "finetune": "sgd"}[stage]
    assert rows["optim.lr"].split() == ["*", "optim.lr", "0.5", "float", "0.001"]  # changed: marked
    assert rows["run.dir"].split() == ["*", "run.dir", f"runs/{name}", "str", "''"]  # interpolated
    assert rows["data.prefetch"].split() == ["data.prefetch", "2", "int", "2"]  # the default: unmarked
    assert "data.path is required" in err and err.startswith("note: ")  # what train would still refuse


def load_config_of(stage: str):
    import importlib

    module = importlib.import_module(f"{stage}.config")
    cls = {"pretrain": "PretrainConfig", "finetune": "FinetuneConfig"}[stage]
    return load_config(getattr(module, cls), "debug_cpu", ["optim.lr=0.5"], recipes_dir=module.RECIPES_DIR)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_config_verb_yaml_loads_back_as_the_same_config_and_a_typo_is_exit_2(stage: str, capsys,
                                                                            tmp_path: Path) -> None:
    assert _stage_main(stage)(["config", "debug_cpu", "optim.lr=0.5", "--yaml"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "r.yaml").write_text(out)
    want = load_config_of(stage)
    assert load_config(type(want), tmp_path / "r.yaml") == want  # pipeable back as a recipe
    assert _stage_main(stage)(["config", "debug_cpu", "optim.lrr=0.5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [err.strip()] and err.startswith("error: unknown config key 'optim.lrr'")
    assert "did you mean 'optim.lr'" in err


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_train_refuses_a_bad_config_before_torch_loads(stage: str) -> None:
    """A typo in `train`'s overrides is answered in a fraction of a second, not after every rank imports torch."""
    import subprocess
    import sys

    code = (f"import sys; from {stage}.__main__ import main; rc = main(['train', 'debug_cpu', 'optim.lrr=1']); "
            "assert rc == 2 and 'torch' not in sys.modules, (rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: unknown config key 'optim.lrr'"), proc.stderr[-2000:]


# values that would run but not as meant: 0 steps, never acting on a preemption signal, a zero timeout...
BAD_VALUES = {"train.steps=-3": "train.steps must be > 0", "train.steps=0": "train.steps must be > 0",
              "checkpoint.every=-5": "checkpoint.every must be >= 0", "eval.every=-1": "eval.every must be >= 0",
              "checkpoint.signal_check_every=0": "checkpoint.signal_check_every must be >= 1",
              "log.progress_every_s=-1": "log.progress_every_s must be >= 0",
              "dist.timeout=0": "dist.timeout must be > 0", "eval.micro_batch=0": "eval.micro_batch must be >= 1",
              # the data section: a loader worker's traceback after the run dir was made, or silently another thing
              "data.crop_pct=2": "data.crop_pct must be in (0, 1]", "data.crop_pct=0": "data.crop_pct must be in",
              "data.scale=[0.9,0.1]": "data.scale must be [min, max]", "data.scale=[0.1,1.5]": "data.scale must be",
              "data.ratio=[2,1]": "data.ratio must be [min, max]", "data.hflip=3": "data.hflip is a probability",
              "data.hflip=-0.5": "data.hflip is a probability", "data.shuffle_buffer=0": "data.shuffle_buffer must be",
              "data.std=[0.5,0,0.5]": "data.std must be > 0 per channel", "data.mean=[0.5,0.5]": "data.mean",
              "data.prefetch=0": "data.prefetch must be >= 1", "data.min_size=-5": "data.min_size must be >= 0",
              "data.timeout_s=0": "data.timeout_s must be > 0", "data.workers=-1": "data.workers must be >= 0",
              "data.randaugment=augmix-m9": "data.randaugment 'augmix-m9': expected",
              "data.randaugment=rand-m11": "data.randaugment 'rand-m11': magnitude must be within 0..10",
              # rates and coefficients: torch's error in every rank after the run dir was made, or a run not as meant
              "optim.betas=[1.5,0.9]": "optim.betas[0] must be in [0, 1)", "optim.momentum=1.5": "optim.momentum must",
              "optim.momentum=-1": "optim.momentum must be in [0, 1)", "optim.min_lr=-1": "optim.min_lr must be in",
              "optim.min_lr=1": "optim.min_lr must be in [0, optim.lr=", "optim.eps=-1": "optim.eps must be >= 0",
              "model.drop_path=1.5": "model.drop_path must be in [0, 1)", "model.dropout=-0.1": "model.dropout must",
              "run.seed=-1": "run.seed must be >= 0", "log.peak_tflops=-1": "log.peak_tflops must be >= 0"}


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_values_that_would_not_run_as_meant_are_refused(stage: str) -> None:
    from finetune.config import load_finetune_config
    from pretrain.config import load_pretrain_config

    load = {"pretrain": load_pretrain_config, "finetune": load_finetune_config}[stage]
    required = ["data.path=d.json", "run.dir=r", *(["init=m.safetensors"] if stage == "finetune" else [])]
    load("debug_cpu", required)  # the recipe itself is fine
    for override, named in BAD_VALUES.items():
        with pytest.raises(ConfigError, match=re.escape(named)):
            load("debug_cpu", [*required, override])
    cfg = load("debug_cpu", [*required, "data.decode=gpu", "data.interpolation=bicubic"])  # both filters on the device
    assert (cfg.data.decode, cfg.data.interpolation) == ("gpu", "bicubic")


# ---- resume: the changed keys ---------------------------------------------------------------------------------

def test_resume_names_changed_keys_and_refuses_those_that_break_exact_resume(tmp_path: Path) -> None:
    from finetune.config import FinetuneConfig
    from pretrain.config import RECIPES_DIR, PretrainConfig
    from runtime.config_schema import config_fields
    from trainer.checkpoint import EXACT_RESUME_KEYS, check_changes, resume_changes

    ckpt_dir = tmp_path / "checkpoints"
    old = load_config(PretrainConfig, "debug_cpu", ["run.dir=a"], recipes_dir=RECIPES_DIR)
    new = load_config(PretrainConfig, "debug_cpu", ["run.dir=b", "run.seed=3", "train.micro_batch=4", "eval.every=7",
                                                    "checkpoint.keep=5", "train.steps=500", "data.path=x"],
                      recipes_dir=RECIPES_DIR)
    saved = {"config": to_dict(old), "config_hash": config_hash(old)}
    breaking, harmless = resume_changes(ckpt_dir, saved, new)
    assert breaking == ["run.seed 0 -> 3", "data.path '' -> x", "train.micro_batch 8 -> 4"]
    assert harmless == ["run.dir a -> b", "train.steps 120 -> 500", "eval.every 60 -> 7", "checkpoint.keep 2 -> 5"]
    with pytest.raises(ConfigError, match=r"^resuming .*global_step4 with changes that break exact resume: run.seed "
                                          r"0 -> 3; data.path '' -> x; train.micro_batch 8 -> 4; .*--allow-changed"):
        check_changes(ckpt_dir, "global_step4", saved, new, allow_changed=False)
    check_changes(ckpt_dir, "global_step4", saved, new, allow_changed=True)
    harmless_only = load_config(PretrainConfig, "debug_cpu", ["run.dir=b", "log.every=1"], recipes_dir=RECIPES_DIR)
    check_changes(ckpt_dir, "global_step4", saved, harmless_only, allow_changed=False)
    del saved["config"]["data"]["min_size"]  # a key added after the checkpoint was written: not refused
    assert resume_changes(ckpt_dir, saved, harmless_only)[0] == []
    assert "data.min_size null -> 16 (a new key)" in resume_changes(ckpt_dir, saved, harmless_only)[1]
    # an older checkpoint (its config's hash only): the run dir's config.yaml, when it is that config
    save_config(old, tmp_path / "config.yaml")
    assert resume_changes(ckpt_dir, {"config_hash": config_hash(old)}, new) == (breaking, harmless)
    assert resume_changes(ckpt_dir, {"config_hash": "0123456789abcdef"}, new) is None
    # every listed key is a key (or section) of a stage's config: a renamed field cannot drop out unnoticed
    keys = {r["key"] for cls in (PretrainConfig, FinetuneConfig) for r in config_fields(cls)}
    assert [k for k in EXACT_RESUME_KEYS if not any(key == k or key.startswith(k + ".") for key in keys)] == []
