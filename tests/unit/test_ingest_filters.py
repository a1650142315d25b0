"""The ingest's quality filters and near-duplicate removal on crafted documents, each figure
computed by hand, and the defaults on the Python standard library (they must drop none of it)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from support.corpus import seed_for
from tasks.ingest import IngestConfig, ingest_fingerprint, run_ingest, stdlib_files
from tasks.ingest_filters import (
    WEB_RULES,
    DocumentFilter,
    FilterConfig,
    line_punctuation_share,
    rules,
    stop_word_count,
    symbol_word_ratio,
    top_ngram_char_share,
)

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
    measure = rules(only)[name].measure
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


# -- the web preset ---------------------------------------------------------------------------

SENTENCES = [
    "The river runs past the old mill and into the quiet valley below.",
    "Farmers there have grown wheat and barley for more than three centuries.",
    "Each spring the water rises with melted snow from the northern hills.",
    "Children walk to the village school along a path beside the bank.",
    "Travellers often stop at the inn to rest their horses and eat bread.",
    "A stone bridge, built with care by local masons, crosses the stream.",
    "Historians say that the town was founded by monks seeking solitude.",
    "Today visitors come to see the gardens and to taste the local cheese.",
]
PROSE = "\n".join(SENTENCES) + "\n"  # 97 words, a sentence per line: every web rule keeps it
REPEATED_LINE = (SENTENCES[0] + "\n") * 4
REPEATED_PARAGRAPH = "\n\n".join([SENTENCES[0] + "\n" + SENTENCES[1]] * 3)

# Each web rule and a document it must drop (the prose above it must keep).
DROPPED_BY = {
    "gopher_word_count": "The cat sat on the mat, and that was all of it.",
    "gopher_mean_word_length": "a b c d e f and the of to " * 10,
    "gopher_symbol_word_ratio": PROSE + "#tag " * 20,
    "gopher_bullet_lines": "".join(f"- {sentence}\n" for sentence in SENTENCES),
    "gopher_ellipsis_lines": PROSE.replace(".\n", "...\n"),
    "gopher_alphabetic_words": PROSE + "12 34 56 78 " * 10,
    "gopher_stop_words": "Apples pears plums figs grapes melons lemons. " * 12,
    "gopher_duplicate_lines": REPEATED_LINE,
    "gopher_duplicate_paragraphs": REPEATED_PARAGRAPH,
    "gopher_duplicate_line_chars": REPEATED_LINE,
    "gopher_duplicate_paragraph_chars": REPEATED_PARAGRAPH,
    "gopher_top_2gram": PROSE + "the mill " * 30,
    "gopher_top_3gram": PROSE + "by the mill " * 20,
    "gopher_top_4gram": PROSE + "down by the mill " * 15,
    **{f"gopher_duplicate_{n}grams": " ".join(SENTENCES * 2) for n in range(5, 11)},
    "c4_lorem_ipsum": PROSE + "Lorem ipsum dolor sit amet.\n",
    "c4_curly_bracket": PROSE + "The set {a, b} has two members.\n",
    "fineweb_line_punctuation": PROSE.replace(".\n", "\n"),
    "fineweb_short_lines": PROSE.replace(", ", ",\n").replace(" and ", "\nand ").replace(" the ", "\nthe "),
    "fineweb_duplicate_line_chars": PROSE + SENTENCES[3] + "\n",
    "fineweb_newline_ratio": "\n".join(f"{a} {b}" for a, b in zip(PROSE.split()[::2], PROSE.split()[1::2])),
}


def test_every_web_rule_is_tested_and_keeps_plain_prose():
    assert set(DROPPED_BY) == set(WEB_RULES)
    web = DocumentFilter(FilterConfig(preset="web"))
    assert web.keep("prose", PROSE), web.counts.dropped


@pytest.mark.parametrize("name", list(DROPPED_BY))
def test_each_web_rule_drops_its_document(name):
    rule = WEB_RULES[name]
    assert not rule.drops(rule.measure(PROSE))
    assert rule.drops(rule.measure(DROPPED_BY[name]))


@pytest.mark.parametrize(
    ("measure", "text", "figure"),
    [
        # '#' twice and '...' once over 6 words
        (symbol_word_ratio, "one #two three... four five #six", 3 / 6),
        # (a b) occurs 3 times in "a b a b a b c": 3 x 2 characters of the 7 word characters
        (lambda text: top_ngram_char_share(text, 2), "a b a b a b c", 6 / 7),
        # lines "x.", "yy", "z!", "ww": two of four end in FineWeb's stop characters
        (line_punctuation_share, "x.\nyy\n\nz!\nww", 2 / 4),
        # 'the', 'of', 'The' (any case) are stop words; 'then' is not
        (stop_word_count, "the cup of The tea then", 3),
    ],
)
def test_web_measures_by_hand(measure, text, figure):
    assert measure(text) == pytest.approx(figure)


def test_presets_pick_the_rules_and_a_set_limit_applies_under_any_preset():
    code = set(rules(FilterConfig()))
    assert code == {"max_repeated_char_share", "max_word_chars", "max_non_alphanumeric_share", "max_line_chars"}
    assert FilterConfig(preset="code") == FilterConfig()
    assert rules(FilterConfig(preset="none")) == {}
    assert set(rules(FilterConfig(preset="web"))) == set(WEB_RULES)
    assert set(rules(FilterConfig(preset="web", max_line_chars=500))) == set(WEB_RULES) | {"max_line_chars"}
    # The default preset stays out of the fingerprint; another enters it.
    assert ingest_fingerprint(IngestConfig(), None, None) == ingest_fingerprint(
        IngestConfig(filters=FilterConfig(preset="code")), None, None
    )
    assert ingest_fingerprint(IngestConfig(filters=FilterConfig(preset="web")), None, None) != ingest_fingerprint(
        IngestConfig(), None, None
    )


def test_the_web_preset_counts_its_drops_per_rule_in_the_report(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "prose.txt").write_text(PROSE)
    (source / "other.txt").write_text("\n".join(reversed(SENTENCES)).replace("the", "a") + "\n")
    (source / "lorem.txt").write_text(DROPPED_BY["c4_lorem_ipsum"].replace("river", "stream"))
    (source / "code.py").write_text("def f(x):\n    return {x: x}\n" * 20)
    filters = FilterConfig(preset="web", near_dedup=False)
    config = IngestConfig(
        source=str(source), val_fraction=0.5, seed=seed_for(["prose.txt", "other.txt"]), filters=filters
    )
    report = run_ingest(config, tmp_path / "ws").report
    assert report["dropped_by_filter"] == {"c4_lorem_ipsum": 1, "gopher_stop_words": 1}  # code: no "the", "of" ...
    assert report["documents_out"] == 2
