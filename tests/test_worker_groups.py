"""The units `make test`'s two workers take (tests/conftest.py): a test file each, and the files whose tests read
a shared session run together, so the run is made once per suite."""

from __future__ import annotations

from types import SimpleNamespace

from tests import conftest
from tests.conftest import worker_unit


def test_files_reading_the_shared_run_are_one_unit_and_the_rest_go_by_file() -> None:
    readers = ("tests/test_pretrain_train.py", "tests/test_fewshot.py", "tests/test_finetune_train.py")
    assert {worker_unit(f) for f in readers} == {"zero2_digits_run"}
    # the last: this file names the run, but none of its tests takes it
    for f in ("tests/test_config.py", "tests/faults/test_training.py", "tests/test_worker_groups.py"):
        assert worker_unit(f) == f


def test_xdist_schedules_by_those_units() -> None:
    """The scheduler the conftest hook gives xdist for `--dist loadfile` maps node ids to worker_unit."""
    opts = {"dist": "loadfile", "tx": ["2*popen"]}
    config = SimpleNamespace(getoption=opts.get, getvalue=opts.get)
    sched = conftest.pytest_xdist_make_scheduler(config, None)
    assert sched._split_scope("tests/test_fewshot.py::test_a[x]") == "zero2_digits_run"
    assert sched._split_scope("tests/test_pretrain_train.py::test_b") == "zero2_digits_run"
    assert sched._split_scope("tests/test_stages.py::test_c[pretrain]") == "tests/test_stages.py"
    assert conftest.pytest_xdist_make_scheduler(SimpleNamespace(getoption={"dist": "load"}.get), None) is None
