"""The ingest's quality filters and near-duplicate removal on crafted documents, each figure
computed by hand, and the defaults on the Python standard library (they must drop none of it)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from support.corpus import seed_for
from tasks.ingest import IngestConfig, run_ingest, stdlib_files
from tasks.ingest_filters import DocumentFilter, FilterConfig, measures

# (filter, document, its figure as computed by hand)
CRAFTED = [
    # runs of >= 16 copies: "=" * 20 and "x" * 16 are 36 of 60 characters; "aaa" and the spaces are not runs
    ("max_repeated_char_share", "=" * 20 + " aaa" + " " * 20 + "x" * 16, 36 / 60),
    ("max_word_chars", "a bb " + "c" * 7 + "\nddd", 7),
    # non-blank lines a, b, a, a, c: two repeat an earlier one -> 2 / 5; the blank line does not count
    ("max_duplicate_line_fraction", "a\nb\n\na\na\nc\n", 2 / 5),
    # 2-grams (xx y) (y xx) (xx y) (y zz): (xx y) twice covers words 0, 1, 2, 3 = "xx y xx y"
    # -> 6 of the 8 word characters (xx y xx y zz)
    ("max_duplicate_ngram_fraction", "xx y xx y zz", 6 / 8),
    # visible characters "a+b=c;" -> "+", "=", ";" are 3 of 6
    ("max_non_alphanumeric_share", "a + b\n= c;", 3 / 6),
    ("max_line_chars", "abc\n" + "d" * 12 + "\nef", 12),
]


@pytest.mark.parametrize("name, text, figure", CRAFTED, ids=[case[0] for case in CRAFTED])
def test_each_filter_keeps_at_its_figure_and_drops_just_above_it(name, text, figure):
    only = FilterConfig.off().model_copy(update={name: figure, "duplicate_ngram_words": 2})
    measure, _ = measures(only)[name]
    assert measure(text) == pytest.approx(figure)
    assert DocumentFilter(only).keep("doc", text)
    below = figure - 1 if isinstance(figure, int) else figure - 1e-6
    dropping = DocumentFilter(only.model_copy(update={name: below}))
    assert not dropping.keep("doc", text)
    assert dropping.counts.dropped == {name: 1}
    assert dropping.counts.examples[name] == [{"id": "doc", "value": pytest.approx(figure, abs=1e-4), "text": text}]


def words(n: int, seed: int) -> list[str]:
    return [f"w{(i * 7919 + seed) % 100003}" for i in range(n)]


def lines(text_words: list[str]) -> str:
    return "".join(" ".join(text_words[i : i + 10]) + "\n" for i in range(0, len(text_words), 10))


def test_near_duplicates_with_small_edits_are_dropped_and_distinct_documents_kept():
    base = words(400, 1)
    edited = list(base)
    edited[100] = "changed"
    edited[300] = "also"  # two words of 400 changed: 10 of ~400 5-word shingles differ, Jaccard ~0.95
    other = words(400, 2)
    near = DocumentFilter(FilterConfig.off().model_copy(update={"near_dedup": True}))
    assert near.keep("a", " ".join(base))
    assert not near.keep("b", " ".join(edited))
    assert near.keep("c", " ".join(other))
    assert near.counts.dropped == {"near_duplicate": 1}
    assert near.counts.examples["near_duplicate"][0]["near"] == "a"


def test_the_ingest_report_counts_each_filter_with_examples(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    good, other = (lines(words(200, seed)) for seed in (3, 4))
    (source / "good.txt").write_text(good)
    (source / "other.txt").write_text(other)
    (source / "near.txt").write_text(good.replace("w", "v", 1))  # one word of 200 changed
    (source / "rule.txt").write_text("#" * 200 + "\n")
    (source / "long.txt").write_text("x = 1; " * 400)
    config = IngestConfig(source=str(source), val_fraction=0.5, seed=seed_for(["good.txt", "other.txt"]))
    report = run_ingest(config, tmp_path / "ws").report
    assert report["dropped_by_filter"] == {"max_repeated_char_share": 1, "max_line_chars": 1, "near_duplicate": 1}
    assert [example["id"] for example in report["dropped_examples"]["max_line_chars"]] == ["long.txt"]
    assert report["documents_out"] == 2


@pytest.mark.slow
def test_the_defaults_drop_nothing_of_the_standard_library(tmp_path):
    with_filters = run_ingest(IngestConfig(), tmp_path / "on")
    without = run_ingest(IngestConfig(filters=FilterConfig.off()), tmp_path / "off")
    dropped = with_filters.report["dropped_by_filter"]
    assert {name: count for name, count in dropped.items() if name != "near_duplicate"} == {}
    kept = set(pq.read_table(with_filters.corpus, columns=["id"]).column("id").to_pylist())
    near = {example["id"] for example in with_filters.report["dropped_examples"].get("near_duplicate", [])}
    assert kept | near <= set(pq.read_table(without.corpus, columns=["id"]).column("id").to_pylist())
    assert len(stdlib_files().files) > 0
