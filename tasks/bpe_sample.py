"""The part of the train split that BPE trains on: whole documents, at most `bpe.max_train_bytes`.

BPE's merges stop improving long before a web-scale corpus ends, while the trainer's time and
its word counts' memory grow with every byte it reads. A train split larger than the cap is
therefore sampled: each document is in the sample when a hash of its id falls under the cap's
share of the split's bytes, so the sample is spread over the whole corpus (not its first files),
is the same on every run and machine, and keeps a document's place whatever else the corpus
holds. The hash's share is an expectation; a document that would take the sample past the
cap is left out, so the cap holds exactly. A split within the cap is read whole, in the
batches the trainer always got, so its tokenizer is the one it was before the cap existed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from tasks.ingest import read_corpus

# Salted apart from the train/val split's hash (`split_of`): with the same hash, train documents
# (hash above the val share) would be sampled from a skewed range.
SAMPLE_SALT = "bpe-sample"


def in_sample(doc_id: str, share: float) -> bool:
    """Whether document `doc_id` is in a sample of `share` of the documents, by hash."""
    digest = hashlib.sha256(f"{SAMPLE_SALT}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


def train_batches(corpus: Path, max_train_bytes: int | None, train_bytes: int) -> Iterator[list[str]]:
    """The texts BPE trains on, in batches: the train split of `corpus` (`train_bytes` UTF-8 bytes,
    from the ingest report) whole when it fits in `max_train_bytes` (None: no cap), else a sample
    of its whole documents of at most `max_train_bytes` bytes."""
    sampled = max_train_bytes is not None and train_bytes > max_train_bytes
    share = max_train_bytes / train_bytes if sampled else 1.0
    taken = 0
    for batch in read_corpus(corpus, split="train"):
        texts = batch.column("text").to_pylist()
        if not sampled:
            yield texts
            continue
        kept = []
        for doc_id, text in zip(batch.column("id").to_pylist(), texts):
            size = len(text.encode())
            if in_sample(doc_id, share) and taken + size <= max_train_bytes:
                kept.append(text)
                taken += size
        if kept:
            yield kept
