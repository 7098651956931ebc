"""A `data.path` of tar URLs (brace pattern, `pipe:`, http) has no dataset.json: both stages' config checks
name everything it then needs in one line, up front, instead of one traceback per key at run time."""

from __future__ import annotations

import pytest

from data_prep.stream_config import DataCfg, names_tar_urls, url_source_problems
from finetune.config import load_finetune_config
from pretrain.config import load_pretrain_config
from runtime.config import ConfigError

URLS = "pipe:curl -s https://host/ds/shards-{000000..000099}.tar"
NEEDED = ("data.num_classes=", "data.samples_per_epoch=", "data.val_split=null")


@pytest.mark.parametrize("path, urls", [
    (URLS, True), ("shards/train-{000000..000009}.tar", True), ("https://host/a.tar", True),
    ("a.tar::b.tar", True), ("shards/train-000000.tar", True), ("shards/dataset.json", False), ("shards", False),
])
def test_which_paths_name_tar_urls(path, urls):
    assert names_tar_urls(path) is urls


@pytest.mark.parametrize("load, extra", [(load_pretrain_config, []), (load_finetune_config, ["init=w.safetensors"])])
def test_every_missing_key_in_one_line_for_both_stages(load, extra, tmp_path):
    base = [f"data.path={URLS}", f"run.dir={tmp_path}", *extra]
    with pytest.raises(ConfigError) as err:
        load("debug_cpu", base)
    line = next(x for x in str(err.value).splitlines() if URLS in x)
    assert all(key in line for key in NEEDED), line
    with pytest.raises(ConfigError) as err:  # what is set is no longer asked for
        load("debug_cpu", [*base, "data.num_classes=10"])
    line = next(x for x in str(err.value).splitlines() if URLS in x)
    assert "data.num_classes" not in line and all(key in line for key in NEEDED[1:]), line
    cfg = load("debug_cpu", [*base, "data.num_classes=10", "data.samples_per_epoch=640", "data.val_split=null"])
    assert cfg.data.samples_per_epoch == 640 and cfg.data.val_split is None


def test_a_dataset_json_needs_none_of_them():
    assert url_source_problems(DataCfg(path="shards/dataset.json")) == []
    assert url_source_problems(DataCfg(path=URLS, num_classes=10, samples_per_epoch=64, val_split=None)) == []
