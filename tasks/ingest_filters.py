"""The ingest's quality filters and near-duplicate removal, as production pipelines apply them.

Each filter measures one figure of a document and drops it above a threshold
(`ingest.filters.<name>`; null turns the filter off):

- `max_repeated_char_share` (Dolma/FineWeb's repetition rules): the share of the document's
  characters that sit in runs of at least `REPEAT_RUN` copies of one non-space character
  (indentation is white space and never counts). A line of one repeated character is 1.0.
- `max_word_chars` (C4 drops lines with a word over 1000 characters): the longest
  white-space-separated word.
- `max_duplicate_line_fraction` (Gopher): the share of non-blank lines that repeat an
  earlier line of the document. Off by default: code repeats `return`, `pass`, `else:`.
- `max_duplicate_ngram_fraction` (Gopher): the share of the characters of words that lie
  in a word n-gram (`duplicate_ngram_words` words) occurring more than once. Off by default,
  for the same reason.
- `max_non_alphanumeric_share` (Gopher's symbol ratio; the Stack's alphanumeric fraction):
  the share of non-space characters that are neither letters nor digits.
- `max_line_chars` (the Stack drops code files with a line over 1000 characters): the
  longest line.

Defaults are chosen for code corpora: on the Python standard library they drop nothing
(measured: tests/unit/test_ingest_filters.py), while a line of one character, a base64 blob on
one line and minified JavaScript each fail at least one of them.

Near duplicates: a document whose MinHash signature (over word shingles of
`near_dedup_shingle_words` words) estimates a Jaccard similarity of at least
`near_dedup_threshold` with a kept document is dropped, keeping the first, with
`datasketch`'s MinHash and LSH index (banded, so each document is compared only with likely
matches, not with every kept one).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from datasketch import MinHash, MinHashLSH
from pydantic import BaseModel, ConfigDict, Field

REPEAT_RUN = 16  # a run of this many copies of one character counts as repetition
_RUN = re.compile(rf"(\S)\1{{{REPEAT_RUN - 1},}}")
EXAMPLES_KEPT = 3  # dropped documents shown per filter in the ingest report
EXAMPLE_CHARS = 80
NUM_PERM = 128  # MinHash permutations: the Jaccard estimate's standard error is about 1/sqrt(128) = 0.09


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_repeated_char_share: float | None = Field(0.5, ge=0, le=1, description="null: off")
    max_word_chars: int | None = Field(1000, ge=1, description="null: off")
    max_duplicate_line_fraction: float | None = Field(None, ge=0, le=1, description="null: off")
    max_duplicate_ngram_fraction: float | None = Field(None, ge=0, le=1, description="null: off")
    duplicate_ngram_words: int = Field(10, ge=1, description="n of the duplicate n-gram filter")
    max_non_alphanumeric_share: float | None = Field(0.75, ge=0, le=1, description="null: off")
    max_line_chars: int | None = Field(1000, ge=1, description="null: off")
    near_dedup: bool = Field(True, description="drop near-duplicate documents (MinHash)")
    near_dedup_threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity")
    near_dedup_shingle_words: int = Field(5, ge=1, description="words per shingle")

    @classmethod
    def off(cls) -> FilterConfig:
        """Every filter and near-dedup off: what the ingest kept before they existed."""
        limits = {name: None for name in cls.model_fields if name.startswith("max_")}
        return cls(**limits, near_dedup=False)


# -- the measures ------------------------------------------------------------------------


def repeated_char_share(text: str) -> float:
    return sum(match.end() - match.start() for match in _RUN.finditer(text)) / max(len(text), 1)


def longest_word(text: str) -> int:
    return max(map(len, text.split()), default=0)


def duplicate_line_fraction(text: str) -> float:
    lines = [line for line in text.splitlines() if line.strip()]
    return (len(lines) - len(set(lines))) / max(len(lines), 1)


def duplicate_ngram_fraction(text: str, n: int) -> float:
    words = text.split()
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(ngrams)
    covered = [False] * len(words)
    for start, ngram in enumerate(ngrams):
        if counts[ngram] > 1:
            covered[start : start + n] = [True] * n
    return sum(len(word) for word, dup in zip(words, covered) if dup) / max(sum(map(len, words)), 1)


def non_alphanumeric_share(text: str) -> float:
    visible = "".join(text.split())
    return sum(not char.isalnum() for char in visible) / max(len(visible), 1)


def longest_line(text: str) -> int:
    return max(map(len, text.splitlines()), default=0)


def measures(config: FilterConfig) -> dict[str, tuple[Callable[[str], float], float]]:
    """The filters that are on: name -> (measure, the most a kept document may have)."""
    n = config.duplicate_ngram_words
    candidates = {
        "max_repeated_char_share": repeated_char_share,
        "max_word_chars": longest_word,
        "max_duplicate_line_fraction": duplicate_line_fraction,
        "max_duplicate_ngram_fraction": lambda text: duplicate_ngram_fraction(text, n),
        "max_non_alphanumeric_share": non_alphanumeric_share,
        "max_line_chars": longest_line,
    }
    limits = {name: getattr(config, name) for name in candidates}
    return {name: (measure, limits[name]) for name, measure in candidates.items() if limits[name] is not None}


# -- applying them -----------------------------------------------------------------------


@dataclass
class FilterCounts:
    """What the filters dropped: a count per filter and the first few examples."""

    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    def drop(self, name: str, doc_id: str, text: str, **details: object) -> None:
        self.dropped[name] = self.dropped.get(name, 0) + 1
        examples = self.examples.setdefault(name, [])
        if len(examples) < EXAMPLES_KEPT:
            examples.append({"id": doc_id, **details, "text": text[:EXAMPLE_CHARS]})


class DocumentFilter:
    """The quality filters, then near-duplicate removal against the documents kept so far."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self.measures = measures(config)
        self.counts = FilterCounts()
        self._lsh = MinHashLSH(threshold=config.near_dedup_threshold, num_perm=NUM_PERM) if config.near_dedup else None

    def keep(self, doc_id: str, text: str) -> bool:
        """Whether to keep the document; a dropped one is counted under the first filter it fails."""
        for name, (measure, limit) in self.measures.items():
            if (value := measure(text)) > limit:
                self.counts.drop(name, doc_id, text, value=round(value, 4))
                return False
        if self._lsh is not None:
            signature = minhash(text, self.config.near_dedup_shingle_words)
            if matches := self._lsh.query(signature):
                self.counts.drop("near_duplicate", doc_id, text, near=sorted(matches)[0])
                return False
            self._lsh.insert(doc_id, signature)
        return True


def minhash(text: str, shingle_words: int) -> MinHash:
    words = text.split()
    shingles = {" ".join(words[i : i + shingle_words]) for i in range(max(len(words) - shingle_words + 1, 1))}
    signature = MinHash(num_perm=NUM_PERM, seed=1)
    signature.update_batch([shingle.encode() for shingle in shingles])
    return signature
