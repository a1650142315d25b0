"""The ingest's quality filters and near-duplicate removal, as production pipelines apply them.

`ingest.filters.preset` picks the rules for a domain:

- `code` (the default): the six limits below, at the defaults chosen for code corpora.
- `web`: the published quality rules of web-text pipelines (`WEB_RULES`, each named after
  its source: Gopher's quality and repetition rules, C4's document rules, FineWeb's own),
  at their published thresholds, for prose such as FineWeb-Edu.
- `none`: no quality filter.

The six limits below are the code preset's; under `web` and `none` they default to off, and
one that is set applies under any preset. Each filter measures one figure of a document and
drops it above a threshold (`ingest.filters.<name>`; null turns the filter off):

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

Near duplicates (`near_dedup`, its own switch under every preset) are set here and removed
after the filters, across the whole corpus, by tasks/ingest_dedup.py: documents whose MinHash
signatures (over word shingles of `near_dedup_shingle_words` words) share an LSH band for
`near_dedup_threshold` form clusters, and each cluster keeps its earliest document.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

REPEAT_RUN = 16  # a run of this many copies of one character counts as repetition
EXAMPLES_KEPT = 3  # dropped documents shown per filter in the ingest report
EXAMPLE_CHARS = 80


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Literal["code", "web", "none"] = Field("code", description="the rules of a domain: code, web or none")
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

    @model_validator(mode="before")
    @classmethod
    def _code_limits_only_for_code(cls, data: Any) -> Any:
        """Under `web` and `none` the code preset's limits default to off; one set still applies."""
        if isinstance(data, dict) and data.get("preset", "code") != "code":
            return {**cls.no_limits(), **data}
        return data

    @classmethod
    def no_limits(cls) -> dict[str, None]:
        """Each of the limits (the `max_` fields) off."""
        return {name: None for name in cls.model_fields if name.startswith("max_")}

    @classmethod
    def off(cls) -> FilterConfig:
        """Every filter and near-dedup off: what the ingest kept before they existed."""
        return cls(**cls.no_limits(), near_dedup=False)


# -- the measures ------------------------------------------------------------------------


# The code preset's measures count characters by class (white space, letters and digits, line
# breaks) over a whole document. They work on the document's code points as a numpy array and
# look each one up in a table that holds Python's own answer (`str.isspace`, `str.isalnum`, ...)
# for every code point: the same figures as a loop over the characters, without a Python step
# per character.


@cache
def every_character() -> str:
    """Every code point (lone surrogates included), in order, as one string."""
    return "".join(map(chr, range(sys.maxunicode + 1)))


@cache
def char_table(test: Callable[[str], bool]) -> np.ndarray:
    """`test` of every code point, as booleans indexed by code point (built once per process:
    `filter` calls `test` from C, faster than a Python loop over 1.1M characters)."""
    table = np.zeros(sys.maxunicode + 1, dtype=bool)
    table[code_points("".join(filter(test, every_character())))] = True
    return table


@cache
def line_break_table() -> np.ndarray:
    """Whether `str.splitlines` ends a line at each code point (\\n, \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85,
    \\u2028, \\u2029): cutting every character into lines ends each line but the last with one."""
    table = np.zeros(sys.maxunicode + 1, dtype=bool)
    table[[ord(line[-1]) for line in every_character().splitlines(keepends=True)[:-1]]] = True
    return table


@lru_cache(maxsize=1)  # the rules measure one document after another: its array is made once
def code_points(text: str) -> np.ndarray:
    """The text's code points (lone surrogates included), as indices into a `char_table`."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.intp)


def longest_gap(marks: np.ndarray) -> int:
    """The longest run of False in `marks`."""
    return int((np.diff(np.flatnonzero(marks), prepend=-1, append=len(marks)) - 1).max())


def repeated_char_share(text: str) -> float:
    """The share of characters in runs of at least `REPEAT_RUN` copies of one non-space character."""
    points = code_points(text)
    if not len(points):
        return 0.0
    starts = np.flatnonzero(np.concatenate(([True], points[1:] != points[:-1])))  # of each run of one character
    lengths = np.diff(starts, append=len(points))
    repeated = (lengths >= REPEAT_RUN) & ~char_table(str.isspace)[points[starts]]
    return int(lengths[repeated].sum()) / len(points)


def longest_word(text: str) -> int:
    """The longest white-space-separated word (as `str.split` separates them)."""
    return longest_gap(char_table(str.isspace)[code_points(text)])


def non_blank_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def repeated_share(parts: list[str], text: str) -> tuple[float, float]:
    """Of `parts` (lines or paragraphs): the share that repeat an earlier one, and the share of
    the text's characters they hold."""
    seen: set[str] = set()
    repeats = repeated_chars = 0
    for part in parts:
        if part in seen:
            repeats += 1
            repeated_chars += len(part)
        seen.add(part)
    return repeats / max(len(parts), 1), repeated_chars / max(len(text), 1)


def duplicate_line_fraction(text: str) -> float:
    return repeated_share(non_blank_lines(text), text)[0]


# The n-gram measures number each word n-gram of a document with numpy, not a tuple per word:
# equal words get equal ids, and an n-gram's id is that of the pair (its first a-gram, the
# b-gram after it), a + b = n, renumbered; so equal n-grams, and only they, share an id.


@lru_cache(maxsize=1)  # the rules measure one document after another: its words are numbered once
def word_ids(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Each white-space-separated word's id (equal words, equal ids) and its length in characters."""
    words = text.split()
    ids = dict(zip(dict.fromkeys(words), itertools.count()))
    return (
        np.fromiter(map(ids.__getitem__, words), dtype=np.int64, count=len(words)),
        np.fromiter(map(len, words), dtype=np.int64, count=len(words)),
    )


@lru_cache(maxsize=16)  # the n-grams of one document, n up to the largest rule's 10
def ngram_ids(text: str, n: int) -> np.ndarray:
    """An id for the word n-gram starting at each word that has n - 1 words after it."""
    if n == 1:
        return word_ids(text)[0]
    first, rest = n - n // 2, n // 2
    count = len(word_ids(text)[0]) - n + 1
    heads, tails = ngram_ids(text, first)[:count], ngram_ids(text, rest)[first : first + count]
    return np.unique(heads * (int(tails.max(initial=0)) + 1) + tails, return_inverse=True)[1].reshape(-1)


def duplicate_ngram_fraction(text: str, n: int) -> float:
    """The share of the word characters in word n-grams that occur more than once."""
    lengths = word_ids(text)[1]
    if len(lengths) < n:
        return 0.0
    grams = ngram_ids(text, n)
    repeated = np.bincount(grams)[grams] > 1  # per n-gram start
    covered = np.convolve(repeated, np.ones(n, dtype=np.int64)) > 0  # per word: in a repeated n-gram
    return int(lengths[covered].sum()) / max(int(lengths.sum()), 1)


def non_alphanumeric_share(text: str) -> float:
    """Of the characters that are not white space, the share that are neither letters nor digits."""
    points = code_points(text)
    space, alphanumeric = char_table(str.isspace)[points], char_table(str.isalnum)[points]
    visible = len(points) - int(np.count_nonzero(space))
    return int(np.count_nonzero(~(space | alphanumeric))) / max(visible, 1)


def longest_line(text: str) -> int:
    """The longest line, as `str.splitlines` cuts them (a \\r\\n pair makes an empty gap, no longer line)."""
    return longest_gap(line_break_table()[code_points(text)])


@dataclass(frozen=True)
class Rule:
    """A figure of a document, and the range a kept document's figure lies in."""

    measure: Callable[[str], float]
    low: float | None = None  # a kept document has at least this
    high: float | None = None  # ... and at most this

    def drops(self, value: float) -> bool:
        return (self.low is not None and value < self.low) or (self.high is not None and value > self.high)


# -- the web preset: published rules at their published thresholds ------------------------
#
# Words are white-space separated (the sources use a word tokenizer; on prose the counts are
# close), lines are non-blank lines, paragraphs are split at blank lines. These rules only
# keep or drop a document: C4's rules that remove lines from a page (those without terminal
# punctuation, with "javascript", cookie and policy notices) would change the text, and are
# not applied.

GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "‣", "◦", "-", "*")
ELLIPSES = ("...", "…")
FINEWEB_STOP_CHARS = (".", "'", '"', "!", "?")  # FineWeb's line-ending punctuation
FINEWEB_SHORT_LINE_CHARS = 30


def paragraphs(text: str) -> list[str]:
    return [paragraph for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip()]


def word_count(text: str) -> float:
    return len(text.split())


def mean_word_length(text: str) -> float:
    words = text.split()
    return sum(map(len, words)) / max(len(words), 1)


def symbol_word_ratio(text: str) -> float:
    """Hash signs and ellipses per word."""
    symbols = text.count("#") + sum(text.count(ellipsis) for ellipsis in ELLIPSES)
    return symbols / max(len(text.split()), 1)


def bullet_line_share(text: str) -> float:
    lines = non_blank_lines(text)
    return sum(line.lstrip().startswith(BULLETS) for line in lines) / max(len(lines), 1)


def ellipsis_line_share(text: str) -> float:
    lines = non_blank_lines(text)
    return sum(line.rstrip().endswith(ELLIPSES) for line in lines) / max(len(lines), 1)


def alphabetic_word_share(text: str) -> float:
    """The share of words with at least one letter."""
    points = code_points(text)
    space = char_table(str.isspace)[points]
    word_starts = ~space & np.concatenate(([True], space[:-1]))
    word_numbers = np.cumsum(word_starts)  # per character: the number of the word it is in (from 1)
    letters = word_numbers[char_table(str.isalpha)[points] & ~space]
    alphabetic = int(np.count_nonzero(np.diff(letters, prepend=0)))  # words with a letter
    return alphabetic / max(int(word_starts.sum()), 1)


def stop_word_count(text: str) -> float:
    # Lower-casing the text or each word gives the same words: no character lowers to white space.
    return sum(map(GOPHER_STOP_WORDS.__contains__, text.lower().split()))


def top_ngram_char_share(text: str, n: int) -> float:
    """The share of the word characters in the most frequent word n-gram's occurrences (when it
    occurs more than once; of several as frequent, the one that occurs first)."""
    lengths = word_ids(text)[1]
    if len(lengths) < n:
        return 0.0
    grams = ngram_ids(text, n)
    counts = np.bincount(grams)
    count = int(counts.max())
    first = int(np.argmax(counts[grams] == count))  # where the first of the most frequent n-grams starts
    return (int(lengths[first : first + n].sum()) * count if count > 1 else 0) / max(int(lengths.sum()), 1)


def line_punctuation_share(text: str) -> float:
    lines = non_blank_lines(text)
    return sum(line.rstrip().endswith(FINEWEB_STOP_CHARS) for line in lines) / max(len(lines), 1)


def short_line_share(text: str) -> float:
    lines = non_blank_lines(text)
    return sum(len(line) <= FINEWEB_SHORT_LINE_CHARS for line in lines) / max(len(lines), 1)


def newline_word_ratio(text: str) -> float:
    return text.count("\n") / max(len(text.split()), 1)


def contains(phrase: str) -> Callable[[str], float]:
    """1 when the document contains `phrase` (any case), else 0."""
    return lambda text: float(phrase in text.lower())


# Gopher: Rae et al. 2021, "Scaling Language Models: Methods, Analysis & Insights from Training
# Gopher", appendix A (quality filters, and the repetition thresholds of its table A1).
# C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning ...", section 2.2.
# FineWeb: Penedo et al. 2024, "The FineWeb Datasets", section 3 (its custom filters).
WEB_RULES: dict[str, Rule] = {
    "gopher_word_count": Rule(word_count, low=50, high=100_000),
    "gopher_mean_word_length": Rule(mean_word_length, low=3, high=10),
    "gopher_symbol_word_ratio": Rule(symbol_word_ratio, high=0.1),
    "gopher_bullet_lines": Rule(bullet_line_share, high=0.9),
    "gopher_ellipsis_lines": Rule(ellipsis_line_share, high=0.3),
    "gopher_alphabetic_words": Rule(alphabetic_word_share, low=0.8),
    "gopher_stop_words": Rule(stop_word_count, low=2),
    "gopher_duplicate_lines": Rule(lambda text: repeated_share(non_blank_lines(text), text)[0], high=0.3),
    "gopher_duplicate_paragraphs": Rule(lambda text: repeated_share(paragraphs(text), text)[0], high=0.3),
    "gopher_duplicate_line_chars": Rule(lambda text: repeated_share(non_blank_lines(text), text)[1], high=0.2),
    "gopher_duplicate_paragraph_chars": Rule(lambda text: repeated_share(paragraphs(text), text)[1], high=0.2),
    **{
        f"gopher_top_{n}gram": Rule(lambda text, n=n: top_ngram_char_share(text, n), high=limit)
        for n, limit in ((2, 0.20), (3, 0.18), (4, 0.16))
    },
    **{
        f"gopher_duplicate_{n}grams": Rule(lambda text, n=n: duplicate_ngram_fraction(text, n), high=limit)
        for n, limit in ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    },
    "c4_lorem_ipsum": Rule(contains("lorem ipsum"), high=0),
    "c4_curly_bracket": Rule(contains("{"), high=0),
    "fineweb_line_punctuation": Rule(line_punctuation_share, low=0.12),
    "fineweb_short_lines": Rule(short_line_share, high=0.67),
    "fineweb_duplicate_line_chars": Rule(lambda text: repeated_share(non_blank_lines(text), text)[1], high=0.01),
    "fineweb_newline_ratio": Rule(newline_word_ratio, high=0.3),
}


def rules(config: FilterConfig) -> dict[str, Rule]:
    """The rules that are on, by name: the preset's published ones, then the limits that are set."""
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
    limited = {
        name: Rule(measure, high=limits[name]) for name, measure in candidates.items() if limits[name] is not None
    }
    return (WEB_RULES if config.preset == "web" else {}) | limited


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
    """The quality filters (near duplicates are found across chunks later: tasks/ingest_dedup.py)."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self.rules = rules(config)
        self.counts = FilterCounts()

    def keep(self, doc_id: str, text: str) -> bool:
        """Whether to keep the document; a dropped one is counted under the first filter it fails."""
        for name, rule in self.rules.items():
            if rule.drops(value := rule.measure(text)):
                self.counts.drop(name, doc_id, text, value=round(value, 4))
                return False
        return True
