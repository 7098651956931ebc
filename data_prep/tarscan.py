"""A fast reader of tar headers: (name, data offset, size) of every regular file of a tar read in place.

Listing ImageNet means parsing 14 M headers; `tarfile` spends about 50 us on each (it builds a TarInfo,
parses pax records and checksums in Python objects), more than reading a 110 KB image from the page cache
costs. This reads each 512-byte header once and decodes only what a listing needs; ustar, GNU long names
(`L`) and pax records (`x`: `path`, `size`) are understood, every other member type is skipped. A header
whose checksum is wrong raises `tarfile.ReadError`, as `tarfile` would.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

BLOCK = 512


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _checksum_ok(h: bytes) -> bool:
    try:
        want = _octal(h[148:156])
    except ValueError:  # not octal digits: not a tar header
        return False
    total = sum(h[:148]) + 8 * 32 + sum(h[156:])  # the checksum field counts as spaces
    return want == total


def _pax(data: bytes) -> dict[str, str]:
    """`%d key=value\\n` records."""
    out, pos = {}, 0
    while pos < len(data):
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return out


def scan_members(f, start: int, size: int) -> Iterator[tuple[str, int, int]]:
    """(name, absolute data offset, size) of each regular file of the tar at bytes [start, start + size) of the
    open binary file `f`."""
    pos, end, long_name, pax = start, start + size, None, {}
    while pos + BLOCK <= end:
        f.seek(pos)
        h = f.read(BLOCK)
        if len(h) < BLOCK or h == bytes(BLOCK):
            return  # end-of-archive marker
        if not _checksum_ok(h):
            raise tarfile.ReadError(f"bad header checksum at byte {pos - start}" if pos > start else "not a tar")
        try:
            kind, n = h[156:157], _octal(h[124:136])
        except ValueError:
            raise tarfile.ReadError(f"bad size field at byte {pos - start}") from None
        data = pos + BLOCK
        if kind in (b"L", b"x", b"g"):
            f.seek(data)
            payload = f.read(n)
            if kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                try:
                    pax = _pax(payload)
                except ValueError:
                    raise tarfile.ReadError(f"bad pax header at byte {pos - start}") from None
        else:
            if pax.get("size", "").isdigit():
                n = int(pax["size"])
            if kind in (b"0", b"\0", b"7"):
                name = pax.get("path") or long_name
                if name is None:
                    name = h[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    prefix = h[345:500].split(b"\0", 1)[0] if h[257:262] == b"ustar" else b""
                    if prefix:
                        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
                if data + n > end:
                    raise tarfile.ReadError(f"member {name} ends after the archive")
                yield name, data, n
            long_name, pax = None, {}
        pos = data + -(-n // BLOCK) * BLOCK
    if pos == start:
        raise tarfile.ReadError("empty file")
