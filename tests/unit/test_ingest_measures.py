"""The filters' measures, vectorised over a document, against their plain definitions: a loop
over the characters, words or lines in Python, kept here as the reference. Every figure must be
the same float on every input: the standard library's files, and strings built to break a
vectorised count (every code point, Unicode digits and letters, combining marks, underscores,
each line break `str.splitlines` honours, runs at the threshold, empty text, very long lines)."""

from __future__ import annotations

import re
import sys
from collections import Counter

import pytest

from tasks.ingest import stdlib_files
from tasks.ingest_filters import (
    GOPHER_STOP_WORDS,
    REPEAT_RUN,
    alphabetic_word_share,
    char_table,
    duplicate_ngram_fraction,
    line_break_table,
    longest_line,
    longest_word,
    non_alphanumeric_share,
    repeated_char_share,
    stop_word_count,
    top_ngram_char_share,
)


def reference_repeated_char_share(text: str) -> float:
    runs = re.compile(rf"(\S)\1{{{REPEAT_RUN - 1},}}")  # the measure's definition before it was vectorised
    return sum(match.end() - match.start() for match in runs.finditer(text)) / max(len(text), 1)


def reference_longest_word(text: str) -> int:
    return max(map(len, text.split()), default=0)


def reference_non_alphanumeric_share(text: str) -> float:
    visible = "".join(text.split())
    return sum(not char.isalnum() for char in visible) / max(len(visible), 1)


def reference_longest_line(text: str) -> int:
    return max(map(len, text.splitlines()), default=0)


def reference_alphabetic_word_share(text: str) -> float:
    words = text.split()
    return sum(any(char.isalpha() for char in word) for word in words) / max(len(words), 1)


def reference_stop_word_count(text: str) -> float:
    return sum(word.lower() in GOPHER_STOP_WORDS for word in text.split())


def reference_duplicate_ngram_fraction(text: str, n: int) -> float:
    words = text.split()
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(ngrams)
    covered = [False] * len(words)
    for start, ngram in enumerate(ngrams):
        if counts[ngram] > 1:
            covered[start : start + n] = [True] * n
    return sum(len(word) for word, dup in zip(words, covered) if dup) / max(sum(map(len, words)), 1)


def reference_top_ngram_char_share(text: str, n: int) -> float:
    words = text.split()
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0.0
    ngram, count = counts.most_common(1)[0]
    return (sum(map(len, ngram)) * count if count > 1 else 0) / max(sum(map(len, words)), 1)


def with_n(measure, n):
    def measure_n(text):
        return measure(text, n)

    measure_n.__name__ = f"{measure.__name__}_{n}"
    return measure_n


PAIRS = [
    (repeated_char_share, reference_repeated_char_share),
    (longest_word, reference_longest_word),
    (non_alphanumeric_share, reference_non_alphanumeric_share),
    (longest_line, reference_longest_line),
    (alphabetic_word_share, reference_alphabetic_word_share),
    (stop_word_count, reference_stop_word_count),
    *[(with_n(duplicate_ngram_fraction, n), with_n(reference_duplicate_ngram_fraction, n)) for n in range(1, 11)],
    *[(with_n(top_ngram_char_share, n), with_n(reference_top_ngram_char_share, n)) for n in (1, 2, 3, 4, 7)],
]

EVERY_CODE_POINT = "".join(map(chr, range(sys.maxunicode + 1)))  # lone surrogates included
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
ADVERSARIAL = [
    "",
    " ",
    "\n",
    "\r\n",
    "a",
    "_",
    "__init__ = 1",
    EVERY_CODE_POINT,
    " ".join(EVERY_CODE_POINT[::7]),
    "Ⅻ ½ ² ٣ ४ ① x² 𝟘 ǅ ß ﬁ İ",  # numbers that are not decimal, title case, ligatures
    "e\u0301 a\u0308\u0308 \u0301\u0301\u0301",  # combining marks, and marks alone
    "a\r\nb\rc\nd" + "".join(f"{char}line{i}" for i, char in enumerate(LINE_BREAKS)),
    "".join(char * 3 for char in LINE_BREAKS) + "end",
    "x" * (REPEAT_RUN - 1) + " " + "y" * REPEAT_RUN + " " * REPEAT_RUN + "\t" * 40 + "\u3000" * 20,
    "=" * REPEAT_RUN + "=" * REPEAT_RUN + "-" * (REPEAT_RUN + 1) + "é" * 30 + "\ud800" * 20,
    "\x00" * 20 + "\x1c" * 20 + "\x85" * 20 + "\u2028" * 20 + "_" * 20,
    "a" * 200_000 + "\n" + "b " * 50_000,
    "\u00a0".join(["word"] * 1000) + "\u200b" * 5,  # no-break space splits words; zero-width space does not
    "The THE the tHe be, to Of and\u00a0that HAVE with withal ΘΕΣ ΑΣ \u212a K\u0130 İ",  # stop words, cases
    "a b a b c d c d c d e f e f",  # most frequent n-grams tied: the one that occurs first counts
    "x y " * 30 + "x y z " * 3 + "y x " * 30,
    " ".join(str(i % 97) for i in range(5000)),  # n-grams repeating with a long period
    "w " * 12,
    "one two three",
]


@pytest.mark.parametrize("measure, reference", PAIRS, ids=[pair[0].__name__ for pair in PAIRS])
@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_each_measure_equals_its_reference_on_adversarial_text(measure, reference, text):
    assert measure(text) == reference(text)


@pytest.fixture(scope="module")
def library_texts() -> dict[str, str]:
    """~100 files spread over the standard library, by path."""
    files = stdlib_files().files
    return {str(path): path.read_bytes().decode("utf-8", "replace") for path in files[:: max(len(files) // 100, 1)]}


@pytest.mark.parametrize("measure, reference", PAIRS, ids=[pair[0].__name__ for pair in PAIRS])
def test_each_measure_equals_its_reference_on_the_standard_library(measure, reference, library_texts):
    for path, text in library_texts.items():
        assert measure(text) == reference(text), path


def test_a_result_is_a_plain_python_number():
    assert type(non_alphanumeric_share("a+b")) is float and type(longest_word("ab c")) is int


@pytest.mark.parametrize("test", [str.isspace, str.isalnum, str.isalpha], ids=lambda test: test.__name__)
def test_a_table_of_a_character_class_holds_pythons_answer_for_every_code_point(test):
    assert char_table(test).tolist() == [test(char) for char in EVERY_CODE_POINT]


def test_line_breaks_are_those_of_splitlines():
    breaks = line_break_table()
    assert {char for char in EVERY_CODE_POINT if breaks[ord(char)]} == set(LINE_BREAKS)
    assert all(len(f"a{char}b".splitlines()) == 2 for char in LINE_BREAKS)
