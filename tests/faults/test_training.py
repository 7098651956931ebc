"""CI-sized training fault scenarios (see tests/faults/training.py); each real 2-rank DeepSpeed job on CPU."""

from __future__ import annotations

import pytest

from tests.faults import training
from tests.faults.harness import Ctx

pytestmark = pytest.mark.slow


# train_kill_rank runs in `make faults` only: its two halves are covered here by train_kill_in_checkpoint (a rank
# killed: every process gone within EXIT_S, torchrun fails) and, sample-exact with evals and mixup, by
# tests/test_stages.py::test_kill_and_resume_equals_uninterrupted[pretrain].
@pytest.mark.parametrize("name", ["train_kill_node", "train_kill_launcher",
                                  "train_kill_in_checkpoint", "preemption", "nan_injection", "disk_full_checkpoint"])
def test_training_fault(name: str, ctx: Ctx) -> None:
    out = getattr(training, name)(ctx)
    assert out.data_lost == 0 and out.exit_s is not None and out.exit_s < training.EXIT_S, out
