"""data_prep.stream_source.tar_members: the fast tar reader agrees with `tarfile` and fails loudly when cut."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from data_prep.stream_source import Counters, is_safe_member, read_shard, tar_members


def _tar(members: dict[str, bytes], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("a_folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # not a file: skipped
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt: int) -> None:
    long_name = "d/" + "k" * 150 + ".jpg" if fmt != tarfile.USTAR_FORMAT else "p" * 120 + "/x.jpg"
    members = {"a.jpg": b"\xff\xd8" * 700, "a.cls": b"3", long_name: bytes(range(256)) * 3, "empty.txt": b""}
    data = _tar(members, fmt)
    assert list(tar_members(io.BytesIO(data))) == list(members.items())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the reference agrees
        assert [m.name for m in tar if m.isreg()] == list(members)


def test_webdataset_writer_output(tmp_path) -> None:
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for i in range(3):
            w.write({"__key__": f"s{i}", "jpg": bytes([i]) * 1000, "cls": str(i).encode()})
    with open(tmp_path / "s.tar", "rb") as f:
        names = [n for n, _ in tar_members(f)]
    assert names == ["s0.cls", "s0.jpg", "s1.cls", "s1.jpg", "s2.cls", "s2.jpg"]
    samples = list(read_shard(str(tmp_path / "s.tar"), Counters(), skip=1))
    assert [(s["__key__"], s["cls"], len(s["jpg"])) for s in samples] == [("s1", b"1", 1000), ("s2", b"2", 1000)]


def test_cut_and_damaged_streams_raise() -> None:
    data = _tar({"a.jpg": b"x" * 3000, "b.jpg": b"y" * 3000}, tarfile.PAX_FORMAT)
    for cut in (len(data) // 2, 700, 100):
        with pytest.raises(tarfile.ReadError):
            list(tar_members(io.BytesIO(data[:cut])))
    damaged = bytearray(data)
    damaged[5] ^= 0xFF  # inside the first header
    with pytest.raises(tarfile.HeaderError):
        list(tar_members(io.BytesIO(bytes(damaged))))
    with pytest.raises(tarfile.ReadError, match="empty"):
        list(tar_members(io.BytesIO(b"")))


def test_unsafe_member_names_are_dropped_and_counted(tmp_path):
    assert is_safe_member("000001.png") and is_safe_member("a/b.cls")
    for bad in ("../x.png", "/etc/x.png", "a/../../x.png", "..\\x.png", "\\x.png"):
        assert not is_safe_member(bad), bad
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name in ("k1.png", "k1.cls", "../../etc/k2.png", "/abs/k3.png", "k4.png", "k4.cls"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    counters = Counters()
    assert [s["__key__"] for s in read_shard(str(tmp_path / "s.tar"), counters)] == ["k1", "k4"]
    assert counters.counts == {"unsafe_member": 2}
