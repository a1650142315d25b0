"""Prompts as token ids: how a model is prompted, primed with examples, and fitted to its context.

Three layouts, each ending where the model should continue:

    document   <|endoftext|> query               a pretrained model continues a document
    pair       query <|sep|>                      a model fine-tuned on pairs writes the completion
    primed     p1 <|sep|> c1 <|endoftext|> ... query <|sep|>   GPT-3's few-shot priming

The `gptflow generate` command and the registered model's pyfunc build prompts here (the
pyfunc bundles `model/`), so both read the same examples file format and cut the same way.
Text is encoded by the caller with special-token text kept plain (model/special_tokens.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from model.checkpoint import PromptFormat
from model.errors import UserError
from model.generate import few_shot_prompt
from model.special_tokens import SpecialIds

Encode = Callable[[str], list[int]]


def parse_examples(text: str, source: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSON Lines text, one object per line with both fields;
    a bad line is refused with its number. Blank lines are skipped."""
    examples = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: line {number} is not JSON ({e.msg}); expected one object per line") from None
        if not isinstance(record, dict):
            raise UserError(f"{source}: line {number} is not a JSON object with prompt and completion")
        for field in ("prompt", "completion"):
            if not isinstance(record.get(field), str):
                raise UserError(f"{source}: line {number} lacks the text field {field!r}")
        examples.append((record["prompt"], record["completion"]))
    if not examples:
        raise UserError(f"{source}: holds no examples")
    return examples


def format_prompt(
    query: list[int],
    special: SpecialIds,
    prompt_format: PromptFormat,
    examples: list[tuple[list[int], list[int]]] | None = None,
) -> list[int]:
    """The token ids to generate from: primed with `examples` when given, else in `prompt_format`."""
    if examples:
        return few_shot_prompt(examples, query, special)
    if prompt_format == "pair":
        return [*query, special.sep]
    return [special.eos, *query]


def encode_examples(examples: list[tuple[str, str]], encode: Encode) -> list[tuple[list[int], list[int]]]:
    return [(encode(prompt), encode(completion)) for prompt, completion in examples]


def fitting_examples(
    examples: list[tuple[list[int], list[int]]], query: list[int], room: int
) -> list[tuple[list[int], list[int]]]:
    """The first examples that fit `room` tokens together with the query (`query <|sep|>`),
    each example taking `prompt <|sep|> completion <|endoftext|>`."""
    used = len(query) + 1
    kept = []
    for prompt, completion in examples:
        used += len(prompt) + len(completion) + 2
        if used > room:
            break
        kept.append((prompt, completion))
    return kept


def check_examples_fit(examples: list[tuple[list[int], list[int]]], query: list[int], room: int, source: str) -> None:
    """Refuse examples that do not all fit `room` tokens with the query, saying how many do."""
    fit = len(fitting_examples(examples, query, room))
    if fit < len(examples):
        raise UserError(
            f"{source}: only {fit} of the {len(examples)} examples fit the context with the prompt "
            f"({room} tokens: block_size minus max_new_tokens); give fewer or shorter examples"
        )


def fit_prompt(prompt: list[int], block_size: int, max_new_tokens: int) -> tuple[list[int], int]:
    """The last `block_size - max_new_tokens` tokens of `prompt` (at least one), and how many
    were dropped from its start: what the CLI and the pyfunc generate from when it is too long."""
    room = max(block_size - max_new_tokens, 1)
    dropped = max(len(prompt) - room, 0)
    return prompt[dropped:], dropped
