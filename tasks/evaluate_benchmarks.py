"""Downstream benchmarks of the evaluate stage, scored as lm-evaluation-harness scores them.

`evaluate.benchmarks` lists them; each has a `name` (its figures are `<name>_acc`, ...), a
`kind` and a `source`: a JSON Lines file, a directory of them (read in name order), or
`hf:NAME`, a dataset on the Hugging Face hub read through `datasets` (`split`, validation by
default); `limit` keeps the first rows.

Kinds:

    hellaswag        HellaSwag's own fields (activity_label, ctx_a, ctx_b, endings, label),
                     preprocessed as lm-eval's `hellaswag` task does (`hellaswag_example`)
    multiple_choice  {"context", "choices", "label"}, used as written
    cloze            {"text"}: LAMBADA, the passage's last word continued from the rest

Multiple choice: each choice is the continuation `" " + choice` of the context; `acc` is the
share of examples whose highest summed log-probability is the label's, `acc_norm` the same
with each sum divided by the choice's length in characters (lm-eval's convention;
build-nanogpt's and llm.c's HellaSwag use the mean loss per token instead: other figures).
Cloze: `acc` is the share of passages whose last word is the greedy continuation, and
`perplexity` exp(-mean summed log-probability of the word), as lm-eval's `lambada` reports.
`<name>_truncated` counts requests whose context was cut from the left to fit the model.

Text is split into tokens as lm-eval splits it (`model.benchmarks.encode_request`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator
from tokenizers import Tokenizer

from model.benchmarks import encode_request
from model.errors import UserError
from model.jsonl import jsonl_records
from model.special_tokens import special_ids
from tasks.core.phased_scoring import score_requests
from tasks.core.workspace import sha256_file

HUB_PREFIX = "hf:"
# A benchmark figure's suffix, and whether lower is better (the gate reads it).
FIGURES = {"acc": False, "acc_norm": False, "perplexity": True}
STAGE_PREFIXES = ("val", "doc", "eval")  # the evaluate stage's own figures: val_loss, doc_loss, ...


class BenchmarkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="its figures are <name>_acc, <name>_acc_norm, ...")
    kind: Literal["hellaswag", "multiple_choice", "cloze"] = Field(
        description="hellaswag: HellaSwag's rows, preprocessed as lm-eval does; multiple_choice: "
        "context/choices/label rows as written; cloze: LAMBADA's passages, the last word predicted"
    )
    source: str = Field(description="a JSON Lines file, a directory of them, or hf:NAME (a hub dataset)")
    split: str = Field("validation", description="the split of an hf: source")
    limit: PositiveInt | None = Field(None, description="score only the first rows; null: all")

    @field_validator("name")
    @classmethod
    def _not_a_stage_prefix(cls, name: str) -> str:
        if name in STAGE_PREFIXES:
            raise ValueError(f"{name!r} would mix its figures with the evaluate stage's {name}_* ones")
        return name


@dataclass(frozen=True)
class MultipleChoice:
    context: str
    choices: list[str]
    label: int


@dataclass(frozen=True)
class Cloze:
    context: str
    word: str  # the continuation, with its leading space


Example = MultipleChoice | Cloze


def read_rows(config: BenchmarkConfig) -> list[tuple[str, dict]]:
    """(where, row) for the source's rows, at most `limit` of them."""
    if config.source.startswith(HUB_PREFIX):
        import datasets

        name = config.source.removeprefix(HUB_PREFIX)
        dataset = datasets.load_dataset(name, split=config.split)
        if config.limit:
            dataset = dataset.select(range(min(config.limit, len(dataset))))
        return [(f"{config.source}[{index}]", row) for index, row in enumerate(dataset)]
    rows = []
    for path in source_files(config):
        rows += jsonl_records(path.read_text(encoding="utf-8"), str(path))
        if config.limit and len(rows) >= config.limit:
            break
    return rows[: config.limit]


def source_files(config: BenchmarkConfig) -> list[Path]:
    """The JSON Lines files of a local source."""
    path = Path(config.source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise UserError(f"evaluate.benchmarks {config.name}: {path} holds no .jsonl file")
        return files
    if not path.is_file():
        raise UserError(
            f"evaluate.benchmarks {config.name}: {path} does not exist (a .jsonl file, a directory or hf:NAME)"
        )
    return [path]


def source_digest(config: BenchmarkConfig) -> str:
    """The source by content, for the evaluate fingerprint: the files' sha256 (and the rows'
    limit), or a hub dataset's own fingerprint of its split."""
    if config.source.startswith(HUB_PREFIX):
        import datasets

        return datasets.load_dataset(config.source.removeprefix(HUB_PREFIX), split=config.split)._fingerprint
    files = source_files(config)
    if len(files) == 1:
        return sha256_file(files[0])
    return hashlib.sha256("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode()).hexdigest()


def source_digests(benchmarks: Sequence[BenchmarkConfig]) -> dict[str, str]:
    """`benchmark:<name>` -> its source's digest, for the fingerprints of what is scored on them."""
    return {f"benchmark:{benchmark.name}": source_digest(benchmark) for benchmark in benchmarks}


def hellaswag_text(text: str) -> str:
    """lm-eval's clean-up of HellaSwag text: WikiHow's `[title]` becomes a sentence end, other
    bracketed tags go, double spaces become one."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def label_of(value: object, choices: int, where: str) -> int | None:
    """An int label, from an int or a numeric string; None when absent or empty."""
    if value is None or value == "":
        return None
    try:
        label = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{where}: label {value!r} is not a choice number") from None
    if not 0 <= label < choices:
        raise UserError(f"{where}: label {label} is not one of the {choices} choices")
    return label


def field(row: dict, name: str, kind: type, where: str):
    value = row.get(name)
    if not isinstance(value, kind) or (kind is list and not all(isinstance(item, str) for item in value)):
        expected = "a list of strings" if kind is list else "a string"
        raise UserError(f"{where}: field {name!r} must be {expected}")
    return value


def nonempty(choices: list[str], where: str) -> list[str]:
    """The choices, refused when there are none or one is empty (acc_norm divides by its length)."""
    if not choices or not all(choices):
        raise UserError(f"{where}: needs at least one choice, none of them empty")
    return choices


def hellaswag_example(row: dict, where: str) -> tuple[MultipleChoice | None, str]:
    """One HellaSwag row as lm-eval's `hellaswag` task presents it; None without a label."""
    context = field(row, "ctx_a", str, where) + " " + field(row, "ctx_b", str, where).capitalize()
    endings = field(row, "endings", list, where)
    query = hellaswag_text(field(row, "activity_label", str, where) + ": " + context)
    label = label_of(row.get("label"), len(endings), where)
    choices = nonempty([hellaswag_text(ending) for ending in endings], where)
    return (None if label is None else MultipleChoice(query, choices, label)), where


def multiple_choice_example(row: dict, where: str) -> tuple[MultipleChoice | None, str]:
    choices = nonempty(field(row, "choices", list, where), where)
    label = label_of(row.get("label"), len(choices), where)
    return (None if label is None else MultipleChoice(field(row, "context", str, where), choices, label)), where


def cloze_example(row: dict, where: str) -> tuple[Cloze, str]:
    context, space, word = field(row, "text", str, where).strip().rpartition(" ")
    if not space:
        raise UserError(f"{where}: field 'text' needs at least two words (a context and the word to predict)")
    return Cloze(context, " " + word), where


READERS = {"hellaswag": hellaswag_example, "multiple_choice": multiple_choice_example, "cloze": cloze_example}


def load_examples(config: BenchmarkConfig) -> list[Example]:
    """The benchmark's examples; rows without a label are refused, counted."""
    rows = read_rows(config)
    if not rows:
        raise UserError(f"evaluate.benchmarks {config.name}: {config.source} has no rows")
    read = [READERS[config.kind](row, where) for where, row in rows]
    unlabelled = [where for example, where in read if example is None]
    if unlabelled:
        raise UserError(
            f"evaluate.benchmarks {config.name}: {len(unlabelled)} of {len(rows)} rows have no label "
            f"(first: {unlabelled[0]}); score a labelled split"
        )
    return [example for example, _ in read]


@dataclass
class BenchmarkScores:
    """Per example: the choices' summed log-probabilities (one for a cloze), and for a cloze
    whether the word was the greedy continuation; `truncated` counts cut contexts."""

    logprobs: list[list[float]]
    greedy: list[bool]
    truncated: int


def score_benchmark(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    examples: list[Example],
    batch_size: int,
    phase: tuple[str, str] = ("evaluate", "benchmark"),
) -> BenchmarkScores:
    """Every example's requests scored in batches on the model's device; progress shown as
    `phase` (stage, phase: `phase_progress`)."""
    eos = special_ids(tokenizer).eos

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    requests, owners = [], []
    for index, example in enumerate(examples):
        continuations = [" " + c for c in example.choices] if isinstance(example, MultipleChoice) else [example.word]
        for continuation in continuations:
            requests.append(encode_request(encode, example.context, continuation, eos))
            owners.append(index)
    scored = score_requests(model, requests, model.config.block_size, batch_size, phase)
    logprobs: list[list[float]] = [[] for _ in examples]
    greedy = [True] * len(examples)
    for owner, result in zip(owners, scored):
        logprobs[owner].append(result.logprob)
        greedy[owner] = greedy[owner] and result.greedy
    return BenchmarkScores(logprobs, greedy, sum(result.truncated for result in scored))


def first_max(values: list[float]) -> int:
    """Index of the largest value, the first on a tie (as numpy's argmax, which lm-eval uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def benchmark_figures(
    model: torch.nn.Module, tokenizer: Tokenizer, config: BenchmarkConfig, batch_size: int, stage: str = "evaluate"
) -> dict[str, float]:
    """The benchmark's figures, named `<name>_...` (see the module docstring); `stage` names
    the stage whose phase the scoring shows as."""
    examples = load_examples(config)
    scores = score_benchmark(model, tokenizer, examples, batch_size, (stage, f"benchmark {config.name}"))
    name, count = config.name, len(examples)
    figures = {f"{name}_examples": float(count), f"{name}_truncated": float(scores.truncated)}
    if config.kind == "cloze":
        mean_logprob = sum(lp for (lp,) in scores.logprobs) / count
        return figures | {f"{name}_acc": sum(scores.greedy) / count, f"{name}_perplexity": math.exp(-mean_logprob)}
    acc = acc_norm = 0
    for example, logprobs in zip(examples, scores.logprobs):
        assert isinstance(example, MultipleChoice)
        acc += first_max(logprobs) == example.label
        per_char = [lp / len(choice) for lp, choice in zip(logprobs, example.choices)]
        acc_norm += first_max(per_char) == example.label
    return figures | {f"{name}_acc": acc / count, f"{name}_acc_norm": acc_norm / count}


def score_names(config: BenchmarkConfig) -> list[str]:
    """The benchmark's scores (the figures a gate can compare): accuracies, or a cloze's accuracy and perplexity."""
    suffixes = ("acc", "perplexity") if config.kind == "cloze" else ("acc", "acc_norm")
    return [f"{config.name}_{suffix}" for suffix in suffixes]


def is_benchmark_figure(name: str) -> bool:
    """Whether a metric name is a benchmark's figure that a gate can compare (`<name>_acc`, ...)."""
    return re.fullmatch(rf"[a-z][a-z0-9_]*_({'|'.join(FIGURES)})", name) is not None


def lower_is_better(name: str) -> bool:
    """Which way a benchmark figure wins: accuracy up, perplexity down."""
    return FIGURES[next(suffix for suffix in sorted(FIGURES, key=len, reverse=True) if name.endswith(suffix))]
