"""Bad inputs through the real CLIs, and the checkpoint pickle check on real DeepSpeed checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.config import ConfigError
from tests.conftest import ROOT
from tests.faults.inputs import Payload, bad_inputs, write_payload_pt
from tests.launch_fixtures import ds_ops_build_env
from trainer.checkpoint import DEEPSPEED_GLOBALS, UnsafeCheckpointError, check_pickles

COMBOS = ["0-fp32", "1-bf16", "2-bf16", "3-bf16"]  # every ZeRO stage (fp16 needs a GPU: see below)


def test_bad_inputs(ctx):
    out = bad_inputs(ctx)
    assert out.data_lost == 0 and out.extra["cases"] >= 30


@pytest.fixture(scope="module")
def real_checkpoints(tmp_path_factory) -> Path:
    """One real checkpoint of the core's DeepSpeed backend per ZeRO stage, after one optimizer step."""
    out = tmp_path_factory.mktemp("ds-checkpoints")
    env = {**os.environ, **ds_ops_build_env()}
    done = subprocess.run([sys.executable, "-m", "tests.faults.inputs", "checkpoints", str(out), *COMBOS], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


def test_real_checkpoints_pass_and_need_the_allowlist(real_checkpoints: Path):
    """Every stage's checkpoint passes; together they use every allowlisted class but the fp16 one."""
    seen = set()
    for combo in COMBOS:
        tag = real_checkpoints / f"z{combo}" / "global_step1"
        assert check_pickles(tag, DEEPSPEED_GLOBALS) >= 1, f"no .pt files in {tag}"
        for f in tag.glob("*.pt"):
            seen |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    fp16_only = {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}
    assert seen == DEEPSPEED_GLOBALS - fp16_only, seen ^ (DEEPSPEED_GLOBALS - fp16_only)
    with pytest.raises(UnsafeCheckpointError, match="names deepspeed"):  # without the backend's allowlist: refused
        check_pickles(real_checkpoints / "z1-bf16" / "global_step1")


def test_fp16_loss_scaler_pickle_is_allowed(tmp_path: Path):
    """fp16 ZeRO checkpoints store the optimizer's DynamicLossScaler (DeepSpeed refuses fp16 on CPU, so this
    checks the object itself, built as DeepSpeed builds it)."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler

    args = {"init_scale": 2.0**16, "scale_window": 1000, "min_scale": 1.0, "delayed_shift": 2,
            "consecutive_hysteresis": False}  # DeepSpeed's defaults for "fp16": {"loss_scale": 0}
    scaler = CreateLossScaler(torch.float16, static_loss_scale=0, dynamic_scaling=True, dynamic_loss_args=args)
    assert type(scaler).__name__ == "DynamicLossScaler"
    (tmp_path / "t").mkdir()
    torch.save({"loss_scaler": scaler, "dynamic_loss_scale": True}, tmp_path / "t" / "optim_states.pt")
    assert check_pickles(tmp_path / "t", DEEPSPEED_GLOBALS) == 1


@pytest.mark.parametrize("combo", COMBOS)
def test_payload_in_a_real_checkpoint_is_refused(real_checkpoints: Path, tmp_path: Path, combo: str):
    """One file of a real checkpoint replaced by a pickle that runs code: refused, naming file and global."""
    tag = tmp_path / "global_step1"
    shutil.copytree(real_checkpoints / f"z{combo}" / "global_step1", tag)
    victim = sorted(tag.glob("*.pt"))[-1]
    marker = tmp_path / "PWNED"
    write_payload_pt(victim, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{victim.name} names .*posix\.system") as err:
        check_pickles(tag, DEEPSPEED_GLOBALS)
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    assert not marker.exists()


def test_payload_is_real(tmp_path: Path):
    """The payload the tests use does run code under DeepSpeed's own load (weights_only=False)."""
    marker = tmp_path / "PWNED"
    torch.load(write_payload_pt(tmp_path / "x.pt", marker), weights_only=False)
    assert marker.exists()


def test_other_pickle_forms_are_refused(tmp_path: Path):
    """A legacy (non-zip) pickle, a protocol-4 pickle (globals built on the stack) and a non-checkpoint."""
    marker = tmp_path / "PWNED"
    cases = {"legacy": (dict(_use_new_zipfile_serialization=False), "not a torch zip checkpoint"),
             "proto4": (dict(pickle_protocol=4), r"cannot be checked|names .*posix\.system")}
    for name, (kw, why) in cases.items():
        d = tmp_path / name
        d.mkdir()
        torch.save({"x": Payload(marker)}, d / "model.pt", **kw)
        with pytest.raises(UnsafeCheckpointError, match=why):
            check_pickles(d)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.pt").write_bytes(os.urandom(1000))
    with pytest.raises(UnsafeCheckpointError, match="not a torch zip checkpoint"):
        check_pickles(tmp_path / "junk")
    assert not marker.exists()
