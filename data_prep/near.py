"""Near-duplicate filter: a 64-bit perceptual hash (DCT pHash) of every image, and a multi-index hash table that
finds every stored hash within a Hamming distance of a query without comparing against all of them.

pHash: grayscale, 32x32 (box filter), 2-D DCT-II, the 8x8 lowest frequencies, one bit per coefficient above
their median. It survives re-encoding, resizing, grayscale conversion and small crops, because those keep
the low frequencies. numpy + PIL only, computed from the image the writer decodes anyway (a JPEG at 1/8
scale): about 35 us an image on top of the write; `imagehash` (not measured here) would be another dependency,
decode again at full size and resize with Lanczos, and has no index.

Default threshold (`NEAR_THRESHOLD` = 10 of 64 bits), measured by `bench/near_dup.py` on scikit-learn's
images (2026-12-02): 400 originals (photo crops at 96-500 px, digits at 64 px) against their copies: JPEG q60
at distance 0-2, resized 0.8x 0-8, grayscale-RGB 0-2, cropped 5 % (2.5 % a side) 0-16 (mean 5, 99th
percentile 12); all 1,600 copies: 99th percentile 10, 99.4 % within 10. Distinct images (1,000 digits against
200 photo crops): closest pair at 10, 1st percentile 16, median 20; 2 of the 1,000 within 10. So 10 catches
all but the most cropped copies while distinct images almost never come that close; a threshold of 8 misses
more crops (the 99th percentile), 12 starts dropping distinct images. Crops off one side only (not centred)
move the hash more (up to ~30 bits at 5 %): pHash is not shift-invariant.

Index (multi-index hashing, Norouzi et al.): the hash is cut into 4 chunks of 16 bits; two hashes within
distance t agree to within t // 4 bits on at least one chunk (pigeonhole), so a query looks up, per chunk,
the buckets of every 16-bit value within t // 4 bits of its own (137 values for t = 8..11) and checks only
those candidates: 70-90 us per query against a million hashes, where a full numpy scan takes ~1.6 ms.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

NEAR_THRESHOLD = 10
HASH_SIDE = 32  # the image is reduced to HASH_SIDE x HASH_SIDE before the DCT
LOW = 8  # LOW x LOW lowest frequencies -> 64 bits
CHUNKS = 4  # 16-bit chunks of the multi-index


def _dct_matrix(n: int) -> np.ndarray:
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT = _dct_matrix(HASH_SIDE)[:LOW]  # only the rows of the frequencies kept: (8, 32)


def phash_image(img: Image.Image) -> int:
    """64-bit DCT pHash of a decoded PIL image (any mode, any size)."""
    grey = img.convert("L") if img.mode != "L" else img
    if grey.size != (HASH_SIDE, HASH_SIDE):
        grey = grey.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX)
    px = np.asarray(grey, np.float64)
    low = (_DCT @ px @ _DCT.T).ravel()  # (64,) coefficients, DC first
    bits = low > np.partition(low, (31, 32))[31:33].mean()  # above the median
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def phash_bytes(data: bytes) -> int:
    """pHash of encoded image bytes; JPEGs are decoded at the smallest DCT scale still >= 32 px (fast), as the
    writer's pass-through check decodes them (`images.encode_image`), so both see the same pixels."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("L", (HASH_SIDE, HASH_SIDE))
    img.load()
    if img.mode in ("P", "RGBA", "LA", "PA") or img.mode.startswith("I"):
        from data_prep.images import to_rgb  # alpha over white, 16-bit scaled: as the shards store them

        img = to_rgb(img)
    return phash_image(img)


def hamming(a: np.ndarray, b: np.ndarray | int) -> np.ndarray:
    """Bitwise Hamming distance of uint64 hashes (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64))).astype(np.int64)


def _masks(radius: int) -> np.ndarray:
    """Every 16-bit value with at most `radius` bits set (XOR-ed onto a chunk: its neighbours)."""
    out = [0]
    for r in range(1, radius + 1):
        out += [sum(1 << b for b in bits) for bits in combinations(range(16), r)]
    return np.array(out, np.int64)


@dataclass
class NearIndex:
    """Stored hashes (uint64) and, per 16-bit chunk c, a bucket table: `order[c * N:(c + 1) * N]` lists hash
    indices sorted by chunk value, and `starts[c, v]` is where value v's bucket begins in `order`."""

    hashes: np.ndarray  # (N,) uint64
    threshold: int
    order: np.ndarray  # (CHUNKS * N,) int64
    starts: np.ndarray  # (CHUNKS, 65537) int64, absolute positions in `order`
    masks: np.ndarray  # (M,) the 16-bit values with at most threshold // CHUNKS bits set
    sorted_hashes: np.ndarray  # hashes[order]: a bucket's hashes lie together (reads stay in cache lines)

    @classmethod
    def build(cls, hashes: np.ndarray, threshold: int = NEAR_THRESHOLD) -> NearIndex:
        """Index `hashes` for lookups within `threshold` bits."""
        if not 0 <= threshold < 32:
            raise ValueError(f"--near-threshold must be in 0..31 bits (of 64), got {threshold}")
        hashes = np.ascontiguousarray(hashes, np.uint64)
        order, starts = [], []
        for c in range(CHUNKS):
            v = ((hashes >> np.uint64(16 * c)) & np.uint64(0xFFFF)).astype(np.int64)
            o = np.argsort(v, kind="stable")
            order.append(o)
            starts.append(np.searchsorted(v[o], np.arange((1 << 16) + 1)) + c * len(hashes))
        order = np.concatenate(order)
        return cls(hashes, threshold, order, np.stack(starts), _masks(threshold // CHUNKS), hashes[order])

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, h: int) -> tuple[int, int] | None:
        """(index of the closest stored hash, its distance) if one is within the threshold, else None;
        ties go to the lowest index, so the answer never depends on the bucket order."""
        return self.lookup_many(np.array([h], np.uint64))[0]

    def lookup_many(self, queries: np.ndarray) -> list[tuple[int, int] | None]:
        """`lookup` of every query at once (numpy's per-call cost paid once per batch, not per image)."""
        q = np.asarray(queries, np.uint64)
        if not len(self.hashes) or not len(q):
            return [None] * len(q)
        shifts = np.uint64(16) * np.arange(CHUNKS, dtype=np.uint64)
        chunks = ((q[:, None] >> shifts[None, :]) & np.uint64(0xFFFF)).astype(np.int64)  # (Q, CHUNKS)
        nb = chunks[:, :, None] ^ self.masks[None, None, :]  # (Q, CHUNKS, M) neighbouring chunk values
        rows = np.arange(CHUNKS)[None, :, None]
        a, b = self.starts[rows, nb].ravel(), self.starts[rows, nb + 1].ravel()
        lens = b - a
        total = int(lens.sum())
        if not total:
            return [None] * len(q)
        # every position a..b-1 of every bucket, without a Python loop (a candidate may come twice: harmless)
        pos = np.repeat(a - np.cumsum(lens) + lens, lens) + np.arange(total)
        qid = np.repeat(np.arange(len(q)).repeat(nb.shape[1] * nb.shape[2]), lens)
        d = np.bitwise_count(self.sorted_hashes[pos] ^ q[qid])
        hit = d <= self.threshold
        qid, d, idx = qid[hit], d[hit].astype(np.int64), self.order[pos[hit]]
        first = np.lexsort((idx, d, qid))  # per query: smallest distance, then lowest index
        out: list[tuple[int, int] | None] = [None] * len(q)
        seen = np.ones(len(first), bool)
        seen[1:] = qid[first][1:] != qid[first][:-1]
        for k in first[seen].tolist():
            out[int(qid[k])] = (int(idx[k]), int(d[k]))
        return out

    def save(self, path: Path, names: list[str]) -> None:
        """Hashes and the downstream image names (what a reject names), atomically."""
        from runtime.io import atomic_write

        buf = io.BytesIO()
        np.savez(buf, hashes=self.hashes, threshold=np.int64(self.threshold),
                 names=np.array(names, dtype=str) if names else np.zeros(0, "<U1"))
        atomic_write(path, buf.getvalue())


def load_index(path: str) -> tuple[NearIndex, np.ndarray]:
    """(index, names) saved by `NearIndex.save` (plain arrays, never pickles)."""
    with np.load(path, allow_pickle=False) as z:
        return NearIndex.build(z["hashes"], int(z["threshold"])), z["names"]


_LOADED: dict[str, tuple[NearIndex, np.ndarray]] = {}


def cached_index(path: str) -> tuple[NearIndex, np.ndarray]:
    """A worker loads the downstream index once, not once per shard."""
    if path not in _LOADED:
        _LOADED.clear()
        _LOADED[path] = load_index(path)
    return _LOADED[path]


def hash_locs(args: tuple[str, str, str, list]) -> tuple[bytes, bytes]:
    """Worker: pHashes of a chunk of a listing's entries (uint64 bytes) and which ones decoded (bool bytes)."""
    from data_prep.readers import read_locs_any_order

    kind, root, column, locs = args
    hashes, ok = np.zeros(len(locs), np.uint64), np.zeros(len(locs), bool)
    for k, data in read_locs_any_order(kind, root, locs, column):
        if isinstance(data, bytes):
            try:
                hashes[k], ok[k] = phash_bytes(data), True
            except Exception:  # noqa: BLE001 - any undecodable downstream image is skipped, whatever PIL raised
                pass
    return hashes.tobytes(), ok.tobytes()


def downstream_index(specs: str, threshold: int, dest: Path, imap=map, chunk: int = 512) -> str:
    """Hash every image of the comma-separated downstream sources (any source `write` reads), save the index
    to `dest` and return the sha256 of the hashes and names (it goes into the plan's fingerprint)."""
    import hashlib

    from data_prep.sources import list_source

    NearIndex.build(np.zeros(0, np.uint64), threshold)  # a bad threshold fails before any work
    all_hashes, names = [], []
    for spec in (s.strip() for s in specs.split(",") if s.strip()):
        listing = list_source(spec, imap)
        # a .tar.gz has no random access: the whole set in one streamed pass, in one worker
        step = max(len(listing), 1) if listing.kind == "gztar" else chunk
        starts = range(0, len(listing), step)
        tasks = [(listing.kind, str(listing.root), listing.column,
                  [listing.loc(i) for i in range(a, min(a + step, len(listing)))]) for a in starts]
        for a, (h, ok) in zip(starts, imap(hash_locs, tasks), strict=True):
            ok = np.frombuffer(ok, bool)
            all_hashes.append(np.frombuffer(h, np.uint64)[ok])
            names += [f"{spec}:{listing.paths[a + k]}" for k in np.flatnonzero(ok).tolist()]
    hashes = np.concatenate(all_hashes) if all_hashes else np.zeros(0, np.uint64)
    NearIndex.build(hashes, threshold).save(dest, names)
    digest = hashlib.sha256(hashes.tobytes())
    digest.update("\n".join(names).encode())
    return digest.hexdigest()
