"""Exact and near dedup across chunks (tasks/ingest_dedup.py) against independent computations:
MinHash band keys against a plain-Python computation of the same definition, the signature's
Jaccard estimate against the exact Jaccard of the shingle sets, and the cluster rule against a
brute force over all pairs; the chunked ingest byte for byte against one chunk."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import textwrap
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tasks.ingest import IngestConfig, run_ingest
from tasks.ingest_dedup import (
    NUM_PERM,
    PERM_A,
    PERM_B,
    SHINGLE_BASE,
    WORD_BASE,
    KeyTable,
    band_keys,
    exact_key,
    find_duplicates,
    lsh_shape,
    position,
    signature,
)
from tasks.ingest_filters import FilterConfig

M = 1 << 64
THRESHOLD = 0.8
VOCABULARY = [f"w{i}" for i in range(5000)]
CHAIN_SEED = 1


def reference_mix(x: int) -> int:
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 % M
    x ^= x >> 27
    x = x * 0x94D049BB133111EB % M
    return x ^ (x >> 31)


def reference_signature(text: str, k: int) -> list[int]:
    """The module's MinHash definition, one Python integer at a time."""
    words = [reference_mix(sum(b * WORD_BASE**j for j, b in enumerate(w)) % M) for w in text.encode().split()]
    shingles = []
    for start in range(max(len(words) - k + 1, 1)):
        value = 0
        for word in words[start : start + k]:
            value = (value * SHINGLE_BASE + word) % M
        shingles.append(reference_mix(value))
    return [min((int(a) * s + int(b)) % M for s in shingles) >> 32 for a, b in zip(PERM_A, PERM_B)]


def reference_band_keys(text: str, k: int = 5) -> list[bytes]:
    bands, rows = lsh_shape(THRESHOLD)
    values = reference_signature(text, k)
    return [
        hashlib.blake2b(
            bytes([band]) + struct.pack(f"<{rows}I", *values[band * rows : (band + 1) * rows]), digest_size=16
        ).digest()
        for band in range(bands)
    ]


def words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(VOCABULARY) for _ in range(n)]


@pytest.mark.parametrize(
    "text", ["", "   \n\t", "one", "two words", "a b c d e", "tabs\tand\nnew lines  é ünï 漢字 x y z", "x " * 300]
)
def test_band_keys_equal_a_plain_python_computation_of_the_definition(text):
    assert band_keys(text.encode(), 5, THRESHOLD) == reference_band_keys(text)
    assert signature(text.encode(), 2).tolist() == reference_signature(text, 2)


def shingle_set(text: str, k: int) -> set[tuple[bytes, ...]]:
    tokens = text.encode().split()
    return {tuple(tokens[i : i + k]) for i in range(max(len(tokens) - k + 1, 1))}


def test_the_signature_estimates_the_jaccard_similarity_of_the_shingle_sets():
    rng = random.Random(0)
    base = words(rng, 400)
    for changed in (0, 10, 40, 120, 400):
        other = base.copy()
        for i in rng.sample(range(400), changed):
            other[i] = rng.choice(VOCABULARY)
        a, b = " ".join(base), " ".join(other)
        exact = len(shingle_set(a, 5) & shingle_set(b, 5)) / len(shingle_set(a, 5) | shingle_set(b, 5))
        estimate = (signature(a.encode(), 5) == signature(b.encode(), 5)).mean()
        assert abs(estimate - exact) < 4 / NUM_PERM**0.5, (changed, exact, estimate)  # 4 standard errors
        shared = set(band_keys(a.encode(), 5, THRESHOLD)) & set(band_keys(b.encode(), 5, THRESHOLD))
        if exact > 0.95:
            assert shared
        if exact < 0.3:
            assert not shared


def brute_force_kept(texts: list[str]) -> tuple[set[int], dict[int, int]]:
    """Exact duplicates (an earlier equal text), and near duplicates -> the earliest document of
    their component, over all pairs sharing a band key."""
    keys = [set(reference_band_keys(text)) for text in texts]
    component = list(range(len(texts)))
    changed = True
    while changed:  # propagate the smallest index along every linked pair until nothing changes
        changed = False
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                if keys[i] & keys[j] and component[i] != component[j]:
                    component[i] = component[j] = min(component[i], component[j])
                    changed = True
    exact = {j for j in range(len(texts)) if texts[j] in texts[:j]}
    near = {j: component[j] for j in range(len(texts)) if component[j] != j and j not in exact}
    return exact, near


def chain_corpus(seed: int = CHAIN_SEED) -> list[str]:
    """A ~ B ~ C (A and C not linked), an exact copy of B, D ~ E, and unrelated documents.

    B has A's last 20 words changed, C B's first 20: Jaccard similarities of about 0.85, 0.85
    and 0.72, so A and C are less likely to share a band; `CHAIN_SEED` picks words for which
    they do not (test_the_chain_corpus_has_a_chain)."""
    rng = random.Random(seed)
    a = words(rng, 300)
    b = a[:280] + words(rng, 20)
    c = words(rng, 20) + b[20:]
    d = words(rng, 200)
    e = d[:197] + words(rng, 3)
    return [" ".join(doc) for doc in (words(rng, 100), a, b, words(rng, 100), c, b, d, words(rng, 80), e)]


def test_the_chain_corpus_has_a_chain():
    a, b, c = (set(reference_band_keys(chain_corpus()[i])) for i in (1, 2, 4))
    assert a & b and b & c and not a & c


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("buckets", [1, 5, 64])
def test_clusters_keep_their_earliest_document_as_a_brute_force_over_all_pairs_does(tmp_path, chunks, buckets):
    texts = chain_corpus()
    exact, near = brute_force_kept(texts)
    assert exact == {5} and near == {2: 1, 4: 1, 8: 6}  # the chain: B and C go with A (A and C are not linked)
    # The documents in `chunks` consecutive chunks, positions (chunk, row) in source order.
    bounds = [round(i * len(texts) / chunks) for i in range(chunks + 1)]
    files, index_of = [], {}
    fs = pafs.LocalFileSystem()
    for chunk in range(chunks):
        table = KeyTable()
        for row, i in enumerate(range(bounds[chunk], bounds[chunk + 1])):
            pos = position(chunk, row)
            index_of[pos] = i
            data = texts[i].encode()
            table.add(pos, exact_key(data), near=False)
            for key in band_keys(data, 5, THRESHOLD):
                table.add(pos, key, near=True)
        path = str(tmp_path / f"{chunk}.keys")
        with fs.open_output_stream(path) as sink:
            files.append((path, table.save(sink, buckets)))
    found = find_duplicates(fs, files, buckets)
    assert {index_of[pos] for pos in found.exact} == exact
    assert {index_of[pos]: index_of[root] for pos, root in found.near.items()} == near


def write_corpus_files(source: Path) -> list[str]:
    """Files of the chain corpus (and a short one, and one the filters drop), in id order."""
    source.mkdir()
    texts = [*chain_corpus(), "short", "=" * 400]
    rng = random.Random(2)
    texts += [" ".join(words(rng, 60)) for _ in range(10)]
    for i, text in enumerate(texts):
        (source / f"{i:03d}.txt").write_text(textwrap.fill(text, 80))  # lines the code preset keeps
    return texts


def test_chunked_ingest_writes_the_bytes_and_report_of_one_chunk(tmp_path):
    write_corpus_files(tmp_path / "src")
    outputs = {}
    for chunk_bytes, buckets in [(1 << 30, 64), (12_000, 64), (4_000, 3), (1, 1)]:
        config = IngestConfig(
            source=str(tmp_path / "src"), chunk_bytes=chunk_bytes, dedup_buckets=buckets, val_fraction=0.3
        )
        output = run_ingest(config, tmp_path / f"ws-{chunk_bytes}")
        manifest = json.loads((output.path / "manifest.json").read_text())
        outputs[chunk_bytes] = (output.corpus.read_bytes(), manifest, output.fingerprint)
        assert not (output.path / "parts").exists()
    (one, *others) = outputs.values()
    assert all(other == one for other in others)
    report = one[1]["report"]
    assert report["dropped_duplicate"] == 1 and report["dropped_short"] == 1
    assert report["dropped_by_filter"]["near_duplicate"] == 3
    assert [example["near"] for example in report["dropped_examples"]["near_duplicate"]] == ["001.txt"] * 2 + [
        "006.txt"
    ]


def test_near_dedup_off_keeps_near_duplicates_and_drops_exact_ones(tmp_path):
    texts = write_corpus_files(tmp_path / "src")
    filters = FilterConfig(near_dedup=False)
    output = run_ingest(IngestConfig(source=str(tmp_path / "src"), filters=filters, chunk_bytes=5000), tmp_path / "ws")
    assert output.report["dropped_duplicate"] == 1
    assert "near_duplicate" not in output.report["dropped_by_filter"]
    assert output.report["documents_out"] == len(texts) - 3  # the copy, the short one, the '=' line
