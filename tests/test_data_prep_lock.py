"""One writer per output folder (data_prep.manifest.claim_output): two `data_prep write` jobs into one OUT deleted
each other's temporary files (one died on a rename of its vanished plan) and raced on the plan. Now a single-node
write and `merge` hold OUT alone, the nodes of a multi-node write hold it together and each its own rank alone;
whoever comes second is refused with one line naming the holder, and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import write_example_images
from data_prep.__main__ import main
from data_prep.manifest import ManifestError
from data_prep.writer import write_shards
from tests.conftest import ROOT

# Holds OUT as node RANK of NODES (1: a single-node write) in another process until its stdin closes.
HOLDER = """
import sys
from data_prep.manifest import claim_output
with claim_output(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_example_images(tmp_path_factory.mktemp("lock") / "images", "digits", per_class=4)


class Holder:
    def __init__(self, out: Path, rank: int = 0, nodes: int = 1):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(rank), str(nodes)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def _listing(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != ".lock")


def test_a_second_write_or_merge_into_a_folder_in_use_is_refused(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    with Holder(out):
        before = _listing(out)
        for argv in (["write", str(images), str(out), "--no-progress"], ["merge", str(out)]):
            if argv[0] == "merge":
                (out / ".parts" / "plan.json").write_text("{}")  # as a finished node's plan would be there
                before = _listing(out)
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: {out} is being written by another data_prep job (pid ") and err.count(
                "\n") == 1, err
            assert "wait for it to end, or write to another folder" in err
            assert _listing(out) == before  # nothing written, nothing removed
    (out / ".parts" / "plan.json").unlink()
    assert main(["write", str(images), str(out), "--no-progress"]) == 0  # the holder is gone: the write runs
    assert (out / "dataset.json").is_file()


def test_the_nodes_of_one_write_share_the_folder_and_each_holds_its_rank(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with Holder(out, rank=0, nodes=2):  # node 0 at work
        report = write_shards(images, out, num_nodes=2, node_rank=1, samples_per_shard=8)  # node 1 beside it
        assert report["shards"] and all((out / name).is_file() for name in report["shards"])
        with pytest.raises(ManifestError, match=f"node 0 of {out} is being written by another data_prep job"):
            write_shards(images, out, num_nodes=2, node_rank=0, samples_per_shard=8)  # node 0 started twice
        with pytest.raises(ManifestError, match=f"^{out} is being written by another data_prep job"):
            write_shards(images, out, samples_per_shard=8)  # a single-node write into the nodes' folder
    with Holder(out):  # a single-node write (or merge) holds it: no node may start
        with pytest.raises(ManifestError, match=f"^{out} is being written"):
            write_shards(images, out, num_nodes=2, node_rank=0, samples_per_shard=8)
    write_shards(images, out, num_nodes=2, node_rank=0, samples_per_shard=8)
    assert main(["merge", str(out), "--no-progress"]) == 0
    assert main(["verify", str(out), "--no-progress"]) == 0


def test_an_unusable_source_still_leaves_no_folder(tmp_path: Path, capsys) -> None:
    """The lock is taken inside OUT before the source is listed; a source found unusable removes the folder it
    made, lock and all, as before."""
    (tmp_path / "empty").mkdir()
    assert main(["write", str(tmp_path / "empty"), str(tmp_path / "a" / "b" / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "a").exists()  # every folder the write made
