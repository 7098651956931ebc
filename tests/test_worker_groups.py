"""The xdist groups tests/conftest.py gives `make test`'s two workers: a file to a worker, and the files that
read a shared session run together, so the run is made once per suite."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.conftest import _worker_groups


@dataclass
class _Item:
    nodeid: str
    fixturenames: tuple[str, ...] = ()
    marks: list = field(default_factory=list)

    def add_marker(self, mark) -> None:
        self.marks.append(mark)

    def group(self) -> str:
        (name,) = [m.args[0] for m in self.marks if m.name == "xdist_group"]
        return name


def test_files_reading_a_shared_run_share_a_worker_and_the_rest_go_by_file() -> None:
    items = [_Item("tests/a.py::test_unit"),  # a file's first test need not use the run
             _Item("tests/a.py::test_reads[x]", ("tmp_path", "zero2_digits_run")),
             _Item("tests/b.py::test_reads", ("zero2_digits_run",)),
             _Item("tests/c.py::test_one", ("digits_shards",)),
             _Item("tests/c.py::test_two")]
    _worker_groups(items)
    assert [i.group() for i in items] == ["zero2_digits_run"] * 3 + ["tests/c.py"] * 2


def test_this_suite_groups_the_shared_run_readers(request: pytest.FixtureRequest) -> None:
    """The real collection: this file is its own group (it reads no shared run)."""
    (mark,) = request.node.iter_markers("xdist_group")
    assert mark.args == ("tests/test_worker_groups.py",)
