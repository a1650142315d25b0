"""The ingest's exact and near-duplicate removal, across chunks, in bounded memory.

The ingest reads its source in chunks (tasks/ingest.py), possibly on many processes. A chunk
cannot know what other chunks hold, so it only computes keys, and a join after all chunks
decides which documents are duplicates:

- each document a chunk keeps gets a position, `chunk << 32 | row` (source order), an exact
  key (a hash of its text) and, with near-dedup on, one key per LSH band of its MinHash
  signature (`band_keys`);
- `KeyTable.save` writes a chunk's keys sorted by bucket (`key % buckets`), so one bucket of
  every chunk is a slice of each chunk's key file;
- `find_duplicates` reads one bucket at a time: documents sharing an exact key are exact
  duplicates of the earliest; documents sharing a band key are linked, and each connected
  component of linked documents (a cluster of near duplicates) keeps its earliest document.

Exact duplicates come first: a document whose text occurred before is an exact duplicate,
even when it is also in a cluster. Near clusters are found among all documents, exact
duplicates included, and that is the same as among the survivors: an exact duplicate has
the band keys of its earlier copy, so it links nothing its copy does not link, and it is never
the earliest of its cluster (its copy is earlier). Both rules depend only on the documents and
their order, not on how the source was cut into chunks or the keys into buckets, so the
result is the same for any number of chunks, workers or buckets.

Why clusters: the one-process rule before (drop a document that shares a band with a *kept*
one) depends on which documents were kept before, which a chunk cannot know. With the
cluster rule a chain A~B~C (A and C not similar) keeps only A; the old rule kept A and C.

Memory (what grows with what):
- a chunk: its key table, `1 + bands` keys of 25 bytes per document of the chunk (bounded by
  `ingest.chunk_bytes`), and a MinHash block of `SHINGLE_BLOCK` x `NUM_PERM` 64-bit values;
- the join: one bucket at a time, every chunk's keys / `ingest.dedup_buckets`, plus the
  duplicates found so far (the exact duplicates' positions, and the union-find of the
  documents in a near cluster of two or more): the duplicates, not the corpus. Raising
  `dedup_buckets` with the corpus keeps a bucket the same size.

MinHash, vectorised per document (`signature`): a word is a maximal run of bytes of the UTF-8
text that are not ASCII white space (`bytes.split()`); each word is hashed once with a
polynomial hash mod 2^64 computed from prefix sums over the bytes (numpy, no Python loop per
word), shingles of `near_dedup_shingle_words` consecutive words combine their words' hashes,
and each of the `NUM_PERM` hash functions `(a * x + b) mod 2^64` (its high 32 bits) applies to
all shingles at once as one matrix operation; the signature is the minimum per function.
A document with fewer words than a shingle has one shingle of all its words. Every constant
is fixed here (none from Python's salted `hash()` or a random generator), so signatures are
the same on every process and platform. The bands and rows per band are datasketch's choice
for `near_dedup_threshold` and `NUM_PERM` (`MinHashLSH(...).b`, `.r`: the split that
minimises false positives and negatives around the threshold).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from datasketch import MinHashLSH

NUM_PERM = 128  # MinHash functions: the Jaccard estimate's standard error is about 1/sqrt(128) = 0.09
SHINGLE_BLOCK = 4096  # shingles hashed at once: a (4096, 128) uint64 block is 4 MiB
KEY_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("pos", "<i8"), ("near", "u1")])
MASK64 = (1 << 64) - 1
WORD_BASE = 0x100000001B3  # the polynomial hash's base (odd: invertible mod 2^64)
SHINGLE_BASE = 0x9E3779B97F4A7C15  # combines a shingle's word hashes
_WHITE_SPACE = np.zeros(256, bool)
_WHITE_SPACE[list(b" \t\n\r\x0b\x0c")] = True  # what bytes.split() splits at


def constants(name: str, count: int) -> np.ndarray:
    """`count` fixed 64-bit constants, from a hash of `name` and the index."""
    values = [
        int.from_bytes(hashlib.blake2b(f"{name}{i}".encode(), digest_size=8).digest(), "little") for i in range(count)
    ]
    return np.array(values, np.uint64)


PERM_A = constants("minhash-a", NUM_PERM) | np.uint64(1)  # odd: each function is a bijection
PERM_B = constants("minhash-b", NUM_PERM)


@cache
def lsh_shape(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) datasketch chooses for `threshold` with `NUM_PERM` functions."""
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    return lsh.b, lsh.r


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit reaches every output bit (uint64, wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def powers(base: int, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) mod 2^64."""
    factors = np.full(n, base, np.uint64)
    factors[:1] = 1
    return np.cumprod(factors, dtype=np.uint64)


def word_hashes(data: bytes) -> np.ndarray:
    """Each word's hash: sum of byte_j * WORD_BASE^j over its bytes mod 2^64, then `mix`ed.

    From prefix sums: P[k] = sum_{j<k} byte_j * BASE^j, so a word [s, e) is
    (P[e] - P[s]) * BASE^-s."""
    text = np.frombuffer(data, np.uint8)
    word = np.concatenate([[False], ~_WHITE_SPACE[text], [False]])
    edges = np.flatnonzero(word[1:] != word[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return np.zeros(0, np.uint64)
    prefix = np.zeros(len(text) + 1, np.uint64)
    np.cumsum(text.astype(np.uint64) * powers(WORD_BASE, len(text)), out=prefix[1:])
    inverse = powers(pow(WORD_BASE, -1, 1 << 64), len(text))
    return mix((prefix[ends] - prefix[starts]) * inverse[starts])


def shingle_hashes(words: np.ndarray, shingle_words: int) -> np.ndarray:
    """A hash per shingle of `shingle_words` consecutive words (one of all words when fewer):
    sum of word_i * SHINGLE_BASE^(k-1-i) mod 2^64, then `mix`ed."""
    count = max(len(words) - shingle_words + 1, 1)
    width = min(shingle_words, len(words))
    shingles = np.zeros(count, np.uint64)
    for offset in range(width):
        shingles = shingles * np.uint64(SHINGLE_BASE) + words[offset : offset + count]
    return mix(shingles)


def signature(data: bytes, shingle_words: int) -> np.ndarray:
    """The MinHash signature of a UTF-8 text: NUM_PERM uint32, the minimum over its shingles of
    the high 32 bits of (a * shingle + b) mod 2^64 (the high bits of the minimum are the
    minimum of the high bits)."""
    shingles = shingle_hashes(word_hashes(data), shingle_words)
    lowest = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
    for start in range(0, len(shingles), SHINGLE_BLOCK):
        block = shingles[start : start + SHINGLE_BLOCK, None] * PERM_A + PERM_B  # (shingles, NUM_PERM)
        np.minimum(lowest, block.min(axis=0), out=lowest)
    return (lowest >> np.uint64(32)).astype("<u4")


def band_keys(data: bytes, shingle_words: int, threshold: float) -> list[bytes]:
    """One 16-byte key per LSH band: a hash of the band's index and its rows of the signature."""
    bands, rows = lsh_shape(threshold)
    values = signature(data, shingle_words)
    return [
        hashlib.blake2b(bytes([band]) + values[band * rows : (band + 1) * rows].tobytes(), digest_size=16).digest()
        for band in range(bands)
    ]


def exact_key(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16, person=b"exact").digest()


def position(chunk: int, row: int) -> int:
    """A document's place in source order: its chunk, then its row in the chunk's part."""
    return chunk << 32 | row


class KeyTable:
    """A chunk's keys, collected per document, saved sorted by bucket."""

    def __init__(self) -> None:
        self._keys = bytearray()
        self._positions: list[int] = []
        self._near: list[bool] = []

    def add(self, pos: int, key: bytes, near: bool) -> None:
        self._keys += key
        self._positions.append(pos)
        self._near.append(near)

    def save(self, sink: pa.NativeFile, buckets: int) -> list[int]:
        """Write the keys to `sink` (raw `KEY_DTYPE` records) bucket after bucket; the bucket
        offsets in records (buckets + 1)."""
        table = np.zeros(len(self._positions), KEY_DTYPE)
        halves = np.frombuffer(bytes(self._keys), "<u8").reshape(-1, 2)
        table["hi"], table["lo"] = halves[:, 0], halves[:, 1]
        table["pos"], table["near"] = self._positions, self._near
        bucket = table["hi"] % np.uint64(buckets)
        order = np.argsort(bucket, kind="stable")
        sink.write(table[order].tobytes())
        return np.searchsorted(bucket[order], np.arange(buckets + 1), side="left").tolist()


@dataclass
class Duplicates:
    """The positions to drop: exact duplicates, and near duplicates with their cluster's kept position."""

    exact: set[int] = field(default_factory=set)
    near: dict[int, int] = field(default_factory=dict)


class Clusters:
    """Union-find over the documents that share a band key with another: memory grows with
    the near duplicates, not the corpus. The root of a component is its earliest position."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, pos: int) -> int:
        parent = self.parent
        parent.setdefault(pos, pos)
        while parent[pos] != pos:
            parent[pos] = parent[parent[pos]]  # path halving
            pos = parent[pos]
        return pos

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


def find_duplicates(fs: pafs.FileSystem, key_files: list[tuple[str, list[int]]], buckets: int) -> Duplicates:
    """Join the chunks' key files (path in `fs`, bucket offsets) one bucket at a time (each
    bucket's slice read, not memory-mapped: mapped pages would stay in the resident set)."""
    duplicates = Duplicates()
    clusters = Clusters()
    for bucket in range(buckets):
        keys = np.concatenate([bucket_keys(fs, path, offsets, bucket) for path, offsets in key_files])
        if len(keys) < 2:
            continue
        keys = keys[np.lexsort((keys["pos"], keys["lo"], keys["hi"]))]
        new_key = np.ones(len(keys), bool)
        new_key[1:] = (keys["hi"][1:] != keys["hi"][:-1]) | (keys["lo"][1:] != keys["lo"][:-1])
        first = np.maximum.accumulate(np.where(new_key, np.arange(len(keys)), 0))  # each key's earliest row
        later = np.flatnonzero(~new_key)
        exact = later[keys["near"][later] == 0]
        duplicates.exact.update(keys["pos"][exact].tolist())
        near = later[keys["near"][later] == 1]
        for a, b in zip(keys["pos"][first[near]].tolist(), keys["pos"][near].tolist()):
            clusters.union(a, b)
    for pos in list(clusters.parent):
        root = clusters.find(pos)
        if root != pos and pos not in duplicates.exact:
            duplicates.near[pos] = root
    return duplicates


def bucket_keys(fs: pafs.FileSystem, path: str, offsets: list[int], bucket: int) -> np.ndarray:
    """One bucket's records of a chunk's key file."""
    start, stop = offsets[bucket] * KEY_DTYPE.itemsize, offsets[bucket + 1] * KEY_DTYPE.itemsize
    with fs.open_input_file(path) as source:
        return np.frombuffer(source.read_at(stop - start, start), KEY_DTYPE)
