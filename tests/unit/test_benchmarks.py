"""Benchmarks of the evaluate stage (tasks/evaluate_benchmarks.py), checked against an independent
computation: the same model as Hugging Face's GPT2LMHeadModel, scored by a few lines of
`transformers` code here, and HellaSwag's preprocessing against hand-written expected text.
lm-eval itself scores the same export in tests/integration/test_harness.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.errors import UserError
from support.progress import phase_lines
from tasks.evaluate import EvaluateConfig, evaluate_fingerprint, evaluate_inputs
from tasks.evaluate_benchmarks import (
    BenchmarkConfig,
    benchmark_figures,
    hellaswag_example,
    load_examples,
    score_benchmark,
    source_digest,
)
from tasks.models.hf_export import export_model
from tasks.models.sources import open_model
from tasks.register import RegisterConfig

transformers = pytest.importorskip("transformers")

HELLASWAG_ROWS = [
    {
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter "
        "clothes smiles.",
        "ctx_b": "then",
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes "
            "snow as the we girls sled.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        "label": "3",
    },
    {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow a lemon tree [title] Pick a pot.",
        "ctx_b": "you need a large pot  with holes",
        "endings": ["[step] Fill it with soil.", "Water it  daily [substeps] twice.", "Sing to it.", "Paint it."],
        "label": 0,
    },
]
# The same rows as lm-eval's hellaswag task presents them, written out by hand.
HELLASWAG_EXPECTED = [
    (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
        "wearing winter clothes smiles. Then",
        [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes "
            "snow as the we girls sled.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        3,
    ),
    (
        "Home and Garden: How to grow a lemon tree. Pick a pot. You need a large pot with holes",
        # lm-eval strips before it removes the tags: "[step] Fill" keeps the space after the tag.
        [" Fill it with soil.", "Water it daily twice.", "Sing to it.", "Paint it."],
        0,
    ),
]
MULTIPLE_CHOICE_ROWS = [
    {"context": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "label": 0},
    {"context": "The capital of France is", "choices": ["Paris", "a city in Spain"], "label": "1"},
    # Longer than the tiny model's 128-token context: cut from the left.
    {"context": "word " * 200 + "and the last", "choices": ["one", "two words"], "label": 1},
]
CLOZE_ROWS = [
    {"text": "The cat sat on the mat and looked at the cat"},
    {"text": "def fibonacci(n): return fibonacci(n - 1) + fibonacci"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def source(tiny_gpt2):
    return open_model(str(tiny_gpt2))


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory):
    """The same model (with the <|pad|> and <|sep|> rows gptflow adds) as a Hugging Face directory."""
    return export_model(source, tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


@torch.no_grad()
def reference(hf_model, hf_tokenizer, context, continuation):
    """(summed log-probability, greedy, context cut) of `continuation` after `context` with transformers: the
    continuation's tokens are those of the whole past the context's, the window its last n_positions + 1."""
    whole = hf_tokenizer.encode(context + continuation, add_special_tokens=False)
    n = len(whole) - len(hf_tokenizer.encode(context, add_special_tokens=False))
    kept = whole[-(hf_model.config.n_positions + 1) :]
    logprobs = hf_model(torch.tensor([kept[:-1]])).logits[0].log_softmax(-1)  # (T, V)
    targets = kept[-n:]
    rows = logprobs[-n:]
    picked = [rows[i, token].item() for i, token in enumerate(targets)]
    greedy = all(rows[i].argmax().item() == token for i, token in enumerate(targets))
    return sum(picked), greedy, len(kept) < len(whole)


def test_hellaswag_rows_are_preprocessed_as_lm_eval_does():
    examples = [hellaswag_example(row, f"row {i}")[0] for i, row in enumerate(HELLASWAG_ROWS)]
    assert [(e.context, e.choices, e.label) for e in examples] == HELLASWAG_EXPECTED


@pytest.mark.parametrize("kind,rows", [("hellaswag", HELLASWAG_ROWS), ("multiple_choice", MULTIPLE_CHOICE_ROWS)])
def test_multiple_choice_figures_equal_transformers(tmp_path, source, hf_model, hf_tokenizer, kind, rows):
    config = BenchmarkConfig(name="mc", kind=kind, source=str(write_jsonl(tmp_path / "rows.jsonl", rows)))
    examples = load_examples(config)
    scores = score_benchmark(source.model, source.tokenizer, examples, batch_size=3)
    scored = [[reference(hf_model, hf_tokenizer, e.context, " " + c) for c in e.choices] for e in examples]
    expected = [[logprob for logprob, _, _ in choices] for choices in scored]
    for got, want in zip(scores.logprobs, expected):
        # Sums of hundreds of fp32 log-probabilities of a random model: equal to fp32's rounding.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)

    figures = benchmark_figures(source.model, source.tokenizer, config, batch_size=2)
    labels = np.array([e.label for e in examples])
    acc = np.mean([np.argmax(lp) for lp in expected] == labels)
    per_char = [np.array(lp) / [len(c) for c in e.choices] for lp, e in zip(expected, examples)]
    acc_norm = np.mean([np.argmax(lp) for lp in per_char] == labels)
    assert (figures["mc_acc"], figures["mc_acc_norm"]) == pytest.approx((acc, acc_norm), abs=1e-12)
    assert figures["mc_examples"] == len(rows)
    assert figures["mc_truncated"] == sum(cut for choices in scored for _, _, cut in choices) > 0


def test_a_benchmark_scores_in_a_phase_named_by_its_stage_and_name(tmp_path, source, capsys):
    config = BenchmarkConfig(name="lambada", kind="cloze", source=str(write_jsonl(tmp_path / "c.jsonl", CLOZE_ROWS)))
    benchmark_figures(source.model, source.tokenizer, config, batch_size=1, stage="register champion")
    batches = len(CLOZE_ROWS)  # one request per row, one per batch
    assert phase_lines(capsys.readouterr().out, "register champion") == {
        "benchmark lambada": [(0, batches), (1, batches), (batches, batches)]
    }


def test_cloze_figures_equal_transformers(tmp_path, source, hf_model, hf_tokenizer):
    config = BenchmarkConfig(name="lambada", kind="cloze", source=str(write_jsonl(tmp_path / "c.jsonl", CLOZE_ROWS)))
    figures = benchmark_figures(source.model, source.tokenizer, config, batch_size=4)
    scored = [
        reference(hf_model, hf_tokenizer, *row["text"].rsplit(" ", 1)[0:1], " " + row["text"].split()[-1])
        for row in CLOZE_ROWS
    ]
    assert figures["lambada_perplexity"] == pytest.approx(np.exp(-np.mean([lp for lp, _, _ in scored])), rel=1e-5)
    assert figures["lambada_acc"] == np.mean([greedy for _, greedy, _ in scored])


def test_rows_without_a_label_are_refused_with_a_count(tmp_path):
    rows = [*HELLASWAG_ROWS, {**HELLASWAG_ROWS[0], "label": ""}, {**HELLASWAG_ROWS[1], "label": None}]
    config = BenchmarkConfig(name="hs", kind="hellaswag", source=str(write_jsonl(tmp_path / "test.jsonl", rows)))
    with pytest.raises(UserError, match=r"hs: 2 of 4 rows have no label \(first: .*test.jsonl:3\)"):
        load_examples(config)


def test_an_empty_choice_is_refused_naming_the_line(tmp_path):
    rows = [*MULTIPLE_CHOICE_ROWS, {"context": "x", "choices": ["a", ""], "label": 0}]
    config = BenchmarkConfig(name="mc", kind="multiple_choice", source=str(write_jsonl(tmp_path / "e.jsonl", rows)))
    with pytest.raises(UserError, match=r"e.jsonl:4: needs at least one choice, none of them empty"):
        load_examples(config)


def test_limit_keeps_the_first_rows_of_a_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", MULTIPLE_CHOICE_ROWS[:2])
    write_jsonl(tmp_path / "b.jsonl", MULTIPLE_CHOICE_ROWS[2:])
    config = BenchmarkConfig(name="mc", kind="multiple_choice", source=str(tmp_path), limit=3)
    assert [e.context for e in load_examples(config)] == [row["context"] for row in MULTIPLE_CHOICE_ROWS]
    assert len(load_examples(config.model_copy(update={"limit": 1}))) == 1


def test_a_hub_source_is_read_through_datasets_by_name_and_split(monkeypatch):
    import datasets

    asked = []
    rows = [{**row, "label": str(row["label"])} for row in HELLASWAG_ROWS]  # the hub's labels are strings

    def load_dataset(name, split):
        asked.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = BenchmarkConfig(name="hs", kind="hellaswag", source="hf:Rowan/hellaswag", limit=1)
    assert [(e.context, e.choices, e.label) for e in load_examples(config)] == HELLASWAG_EXPECTED[:1]
    assert source_digest(config) == datasets.Dataset.from_list(rows)._fingerprint  # by content
    assert asked == [("Rowan/hellaswag", "validation")] * 2


def test_benchmarks_enter_the_fingerprint_by_content(tmp_path):
    inputs = ("a" * 64, "b" * 64, "c" * 16, "d" * 64)
    bare = evaluate_fingerprint(EvaluateConfig(), evaluate_inputs(*inputs))

    def with_benchmark(path):
        config = EvaluateConfig(benchmarks=[BenchmarkConfig(name="mc", kind="multiple_choice", source=str(path))])
        return evaluate_fingerprint(config, evaluate_inputs(*inputs, config.benchmarks))

    first = with_benchmark(write_jsonl(tmp_path / "one.jsonl", MULTIPLE_CHOICE_ROWS))
    moved = with_benchmark(write_jsonl(tmp_path / "moved.jsonl", MULTIPLE_CHOICE_ROWS))
    changed = with_benchmark(write_jsonl(tmp_path / "two.jsonl", MULTIPLE_CHOICE_ROWS[:2]))
    assert first == moved  # the path is not the content
    assert len({bare, first, changed}) == 3


def test_a_gate_on_a_benchmark_wins_upwards_on_accuracy_downwards_on_perplexity():
    assert not RegisterConfig(gate_metric="hellaswag_acc_norm").lower_is_better
    assert not RegisterConfig(gate_metric="hellaswag_acc").lower_is_better
    assert RegisterConfig(gate_metric="lambada_perplexity").lower_is_better
    with pytest.raises(ValueError, match="hellaswag_accuracy"):
        RegisterConfig(gate_metric="hellaswag_accuracy")


def test_a_gate_on_an_unconfigured_benchmark_fails_at_load_time():
    from flows.pipeline_config import PipelineConfig

    with pytest.raises(ValueError, match="'hs_acc' is no figure of evaluate.benchmarks"):
        PipelineConfig(name="x", register={"gate_metric": "hs_acc"})


def test_benchmark_names_must_differ_and_not_shadow_the_stage_figures():
    with pytest.raises(ValueError, match="must differ"):
        EvaluateConfig(benchmarks=[{"name": "a", "kind": "cloze", "source": "x"}] * 2)
    with pytest.raises(ValueError, match="val_"):
        BenchmarkConfig(name="val", kind="cloze", source="x")
