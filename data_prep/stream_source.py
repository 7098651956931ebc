"""Where the stream's samples come from: the shard list, reading shards with faults counted, and the
per-reader sample sequences (which raw samples each DataLoader worker of each rank reads, in what order).

A "reader" (slot) is one DataLoader worker of one rank: slot = rank * workers + worker. Everything here is a
pure function of (seed, epoch, slot layout), so any reader can regenerate its sequence and skip ahead.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import random
import shlex
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys

from data_prep.manifest import read_manifest

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
KEPT_MEMBERS = {*IMAGE_EXTS, "cls"}
MAX_SHARD_NAMES = 100  # shards named in the stats, at most


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # None when read from a bare URL list


@dataclass(frozen=True)
class Source:
    """The shards of one split, in the order written (dataset.json) or given."""

    shards: tuple[Shard, ...]
    classes: tuple[str, ...] | None = None

    @property
    def counted(self) -> bool:
        return all(s.samples is not None for s in self.shards)

    @property
    def samples(self) -> int | None:
        return sum(s.samples for s in self.shards) if self.counted else None


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def _shard_url(root: str | None, folder: Path, name: str) -> str:
    if root is None:
        return str(folder / name)
    if "{name}" in root:  # e.g. "pipe:aws s3 cp s3://bucket/ds/{name} -"
        return root.format(name=shlex.quote(name) if root.startswith("pipe:") else name)
    return root.rstrip("/") + "/" + name


class MissingSplit(ValueError):
    """A split the dataset.json does not have (the caller names the config key that asked for it)."""


def _from_manifest(path: Path, split: str, shard_root: str | None) -> Source:
    meta = read_manifest(path)
    if split not in meta["splits"]:
        raise MissingSplit(f"{path}: no split {split!r}; it has {sorted(meta.get('splits', {}))}")
    shards = tuple(Shard(_shard_url(shard_root, path.parent, s["name"]), int(s["samples"]))
                   for s in meta["splits"][split]["shards"] if int(s["samples"]) > 0)
    if shard_root is None:
        missing = [s.url for s in shards if not Path(s.url).exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in {path} are missing, e.g. {missing[0]}; "
                                    "re-run `python -m data_prep write` to complete the dataset")
    return Source(shards, tuple(meta.get("classes") or ()) or None)


def resolve_source(source: str | Path | Sequence[str], split: str, shard_root: str | None = None) -> Source:
    """A `dataset.json` (or its folder), or a brace pattern / list of tar URLs (local, `pipe:`, http(s))."""
    if isinstance(source, (str, Path)) and not str(source).startswith(("pipe:", "http:", "https:")):
        path = Path(source)
        if path.is_dir():
            path = path / "dataset.json"
        if path.suffix == ".json":
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: pass a dataset.json written by data_prep, or tar URLs")
            return _from_manifest(path, split, shard_root)
    patterns = [str(source)] if isinstance(source, (str, Path)) else [str(s) for s in source]
    urls = [u for p in patterns for u in expand_urls(p)]  # braces and '::' lists, as webdataset reads them
    if not urls:
        raise ValueError("no shards given: pass a dataset.json, a brace pattern or a list of tar URLs")
    local_missing = [u for u in urls if ":" not in u.split("/")[0] and not Path(u).exists()]
    if local_missing:
        raise FileNotFoundError(f"{len(local_missing)} of {len(urls)} shard paths do not exist, e.g. "
                                f"{local_missing[0]}; check the pattern")
    return Source(tuple(Shard(u, None) for u in urls))


class Counters:
    """Fault and sample counters of one reader; `take()` hands over what accrued since the last call."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.shards: set[str] = set()
        self.muted = False  # while re-reading samples that a resumed run already counted

    def add(self, reason: str, n: int = 1, shard: str | None = None) -> None:
        if self.muted:
            return
        self.counts[reason] += n
        if shard is not None and len(self.shards) < MAX_SHARD_NAMES:
            self.shards.add(shard)

    def take(self) -> dict:
        delta = {"counts": dict(self.counts), "shards": sorted(self.shards)}
        self.counts.clear()
        self.shards.clear()
        return delta


ZERO_BLOCK = bytes(512)


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # a pipe may return less than asked before its end
        more = stream.read(n - len(data))
        if not more:
            raise tarfile.ReadError(f"unexpected end of data ({len(data)} of {n} bytes)")
        data += more
    return data


def _number(field: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when the high bit is set (sizes over 8 GiB)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header (records: b"<len> key=value\\n"), if it has one."""
    pos = 0
    while pos < len(records):
        space = records.index(b" ", pos)
        end = pos + int(records[pos:space])
        key, _, value = records[space + 1:end - 1].partition(b"=")
        if key == b"path":
            return value.decode()
        pos = end
    return None


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of an uncompressed tar stream, in order (ustar, pax, GNU names).

    About 4x faster than `tarfile` in stream mode, whose per-member header parsing costs a fifth of a
    small JPEG decode. Raises tarfile.ReadError on a cut stream and HeaderError on a damaged header.
    """
    long_name, first = None, True
    while True:
        header = stream.read(512)
        if not header and first:
            raise tarfile.ReadError("empty file")
        if not header or header == ZERO_BLOCK:  # end of the archive
            return
        first = False
        if len(header) < 512:
            raise tarfile.ReadError("unexpected end of data inside a header")
        if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field as spaces
            raise tarfile.HeaderError("bad tar header checksum")
        size, kind = _number(header[124:136]), header[156:157]
        data = _read_exact(stream, size)
        if size % 512:
            _read_exact(stream, 512 - size % 512)
        if kind == b"x":  # pax header: its path applies to the next member
            long_name = _pax_path(data) or long_name
        elif kind == b"L":  # GNU long name
            long_name = data.rstrip(b"\0").decode()
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].split(b"\0", 1)[0].decode()
            prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None
        else:  # directories, links, global headers: nothing to read
            long_name = None if kind != b"g" else long_name


def is_safe_member(name: str) -> bool:
    """Whether a tar member name is safe to group by key: not absolute and without '..' components (a shard is
    data, never a set of paths to write, but a name like `../../etc/x.png` marks a hostile or broken shard)."""
    return not name.startswith(("/", "\\")) and ".." not in name.replace("\\", "/").split("/")


Owned = Callable[[int], bool]  # sample index within a shard -> whether this reader counts its faults


def read_shard(url: str, counters: Counters, skip: int = 0, owned: Owned | None = None) -> Iterator[dict]:
    """The samples of one tar shard (dicts of member bytes by extension, plus `__key__`), after `skip`.

    A shard that cannot be opened, or breaks off mid-way (truncated, damaged header), ends early and is
    counted; the samples read before the break are kept. Members with unsafe names are dropped and counted.
    `owned(i)`: whether this reader owns the shard's sample i. Readers that share a shard (or read past their
    share after a truncated one) count only the faults in their own share, so that each fault of an epoch is
    counted exactly once; every sample carries `__owned__` for the same purpose. None: count everything.
    """
    mine = owned or (lambda i: True)
    try:
        stream = gopen(url, "rb")
    except Exception:  # missing file, failing command: any of them only costs this shard
        if mine(0):
            counters.add("unreadable_shard", shard=url)
        return
    n = 0

    def members() -> Iterator[dict]:
        for name, data in tar_members(stream):
            if is_safe_member(name):
                yield {"fname": name, "data": data, "__url__": url}
            elif mine(n):
                counters.add("unsafe_member", shard=url)

    try:
        for sample in group_by_keys(members(), suffixes=KEPT_MEMBERS):  # .json metadata is not kept in memory
            n += 1
            if n > skip:
                sample["__owned__"] = mine(n - 1)
                yield sample
    except (tarfile.TarError, OSError, EOFError, ValueError):  # ValueError: bad numbers, names
        if mine(n):  # the break is where sample n should have been
            counters.add("truncated_shard" if n else "unreadable_shard", shard=url)
    finally:
        try:
            stream.close()
        except OSError:  # a pipe closed early reports its exit status; the samples were read
            pass


def _endless(shards: Iterable[tuple[str, Owned | None]], patience: int, counters: Counters,
             skip: int = 0) -> Iterator[dict]:
    """Samples of `shards` ((url, owned) pairs) one after another (skipping `skip` in the first); a clear
    error, not a silent hang, when `patience` shards in a row give nothing."""
    empty = 0
    for i, (url, owned) in enumerate(shards):
        got = 0
        for sample in read_shard(url, counters, skip if i == 0 else 0, owned):
            got += 1
            yield sample
        empty = 0 if got else empty + 1
        if empty >= patience:
            raise RuntimeError(f"{empty} shards in a row gave no sample (last {url}): the data is unreadable")


def _window(base: int, lo: int, hi: int) -> Owned:
    """Ownership of a shard whose first sample sits at `base` of a sequence, for a reader owning [lo, hi)."""
    return lambda i: lo <= base + i < hi


def shuffled(items: Iterable, bufsize: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of `bufsize` items (all of a finite stream comes out)."""
    buf: list = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shard order of an epoch: one permutation shared by every rank."""
    order = list(range(n))
    random.Random(derive_seed(seed, epoch, "shards")).shuffle(order)
    return order


def batches_of(slot: int, total: int, workers: int) -> int:
    """How many of batches 0..total-1 fall to `slot`, when batch i is made by slot i % workers."""
    return max(0, (total - slot + workers - 1) // workers)


def train_samples(src: Source, *, seed: int, epoch: int, slot: int, slots: int, start: int, needed: int,
                  resampled: bool, shuffle_buffer: int, counters: Counters) -> Iterator[dict]:
    """The raw training samples of one reader for one epoch, endless (the caller takes what it needs).

    - dataset.json (counts known): the epoch's shard order is one sample sequence; this reader takes the
      `needed` samples from offset `start`, shuffled among themselves, so the readers of all ranks cover
      each sample at most once per epoch, whatever the shard sizes. If shards came up short (truncated),
      the reader goes on into the following samples.
    - bare URL list: this reader's shards are every `slots`-th of the epoch order, read pass after pass
      (uneven shards then repeat some samples within an epoch: prefer a dataset.json).
    - resampled: shards drawn with replacement from a per-reader generator (as OpenCLIP does).
    """
    n = len(src.shards)
    rng = random.Random(derive_seed(seed, epoch, slot, "samples"))
    if resampled:
        draws = ((src.shards[rng.randrange(n)].url, None) for _ in itertools.count())
        yield from shuffled(_endless(draws, max(n, 16), counters), shuffle_buffer, rng)
        return
    order = epoch_order(n, seed, epoch)
    if not src.counted:
        mine = [(src.shards[i].url, None) for i in order[slot::slots]]
        while True:  # pass after pass over this reader's shards, each pass shuffled on its own
            yield from shuffled(_endless(mine, len(mine), counters), shuffle_buffer, rng)
    counts = [src.shards[i].samples for i in order]
    total = sum(counts)
    lo = start = start % total
    first = 0
    while start >= counts[first]:  # find the shard holding sample `start` of the epoch sequence
        start -= counts[first]
        first += 1
    bases = list(itertools.accumulate(counts, initial=0))  # position of each shard's first sample in the epoch
    # this reader's share is [lo, lo + needed) of the sequence; past it (after a truncated shard) the samples
    # are another reader's, or the next epoch's, and so are their faults
    shards = ((src.shards[order[k % n]].url, _window(bases[k % n] + k // n * total, lo, lo + needed))
              for k in itertools.count(first))
    raw = _endless(shards, n, counters, skip=start)
    yield from shuffled(itertools.islice(raw, needed), shuffle_buffer, rng)
    yield from shuffled(raw, shuffle_buffer, rng)


def range_samples(src: Source, lo: int, hi: int, counters: Counters) -> Iterator[dict]:
    """Samples lo..hi-1 of the split in written order (eval); fewer if a shard came up short."""
    pos = 0
    for shard in src.shards:
        a, b = max(lo, pos), min(hi, pos + shard.samples)
        if a < b:
            yield from itertools.islice(read_shard(shard.url, counters, a - pos, _window(pos, lo, hi)), b - a)
        pos += shard.samples
