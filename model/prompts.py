"""Prompts as token ids: how a model is prompted, primed with examples, and fitted to its context.

Layouts, each ending where the model should continue:

    document   <|endoftext|> query               a pretrained model continues a document
    pair       query <|sep|>                      a model fine-tuned on pairs writes the completion
    primed     p1 <|sep|> c1 <|endoftext|> ... query <|sep|>   few-shot priming in the pairs' format
    primed as a document
               <|endoftext|> p1 c1 (blank line) p2 c2 (blank line) query
                                                  GPT-3's priming of a pretrained model: plain text,
                                                  as the corpus shows it (`document_text`)

The `gptflow generate` command and the registered model's pyfunc build prompts here (the
pyfunc bundles `model/`), so both read the same examples file format and cut the same way.
Text is encoded by the caller with special-token text kept plain (model/special_tokens.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model.checkpoint import PromptFormat
from model.errors import UserError
from model.generate import few_shot_prompt
from model.jsonl import jsonl_records
from model.special_tokens import SpecialIds

Encode = Callable[[str], list[int]]


def parse_examples(text: str, source: str) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSON Lines text, one object per line with both fields;
    a bad line is refused with its number. Blank lines are skipped."""
    examples = []
    for where, record in jsonl_records(text, source):
        for field in ("prompt", "completion"):
            if not isinstance(record.get(field), str):
                raise UserError(f"{where}: lacks the text field {field!r}")
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


def document_text(examples: list[tuple[str, str]], query: str) -> str:
    """The examples and the query as one document: each example's prompt then its completion,
    a blank line after each, then the query."""
    return "".join(f"{prompt}{completion.rstrip()}\n\n" for prompt, completion in examples) + query


# Tokens an example's text can lose when encoded inside the whole document rather than alone
# (its blank line merging with the next text): more than the joins of byte-level BPE ever save.
JOIN_SLACK = 4


def document_primed_prompt(
    examples: list[tuple[str, str]],
    query: str,
    encode: Encode,
    special: SpecialIds,
    room: int,
    limit: int | None = None,
    lengths: list[int] | None = None,
) -> tuple[list[int], list[tuple[str, str]]]:
    """`<|endoftext|>` then the `document_text` of the examples that fit `room` tokens with the
    query, and those examples. They are chosen as `fitting_examples` chooses the `<|sep|>`
    layout's: in order, at most `limit`, an example that would overflow passed over for the ones
    after it. Each is tried on the whole text, encoded as the corpus was (encoded apart, the blank
    lines between examples would split into other tokens). `lengths`, each example's own token
    count (`document_lengths`), passes over the ones that cannot fit without encoding anything."""
    lengths = lengths if lengths is not None else document_lengths(examples, encode)
    chosen: list[tuple[str, str]] = []
    ids = [special.eos, *encode(document_text(chosen, query))]
    for example, length in zip(examples, lengths):
        if limit is not None and len(chosen) == limit:
            break
        if len(ids) + length - JOIN_SLACK > room:  # too long whatever the joins merge
            continue
        tried = [special.eos, *encode(document_text([*chosen, example], query))]
        if len(tried) <= room:
            chosen, ids = [*chosen, example], tried
    return ids, chosen


def document_lengths(examples: list[tuple[str, str]], encode: Encode) -> list[int]:
    """Each example's token count as its own document text (prompt, completion, blank line)."""
    return [len(encode(document_text([example], ""))) for example in examples]


def encode_examples(examples: list[tuple[str, str]], encode: Encode) -> list[tuple[list[int], list[int]]]:
    return [(encode(prompt), encode(completion)) for prompt, completion in examples]


def fitting_examples(
    examples: list[tuple[list[int], list[int]]], query: list[int], room: int, limit: int | None = None
) -> list[tuple[list[int], list[int]]]:
    """The first examples (at most `limit`) that fit `room` tokens together with the query
    (`query <|sep|>`), in order, each taking `prompt <|sep|> completion <|endoftext|>`; an
    example that would overflow is passed over for the ones after it."""
    used = len(query) + 1
    kept = []
    for prompt, completion in examples:
        if limit is not None and len(kept) == limit:
            break
        if used + len(prompt) + len(completion) + 2 <= room:
            used += len(prompt) + len(completion) + 2
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


@dataclass
class PromptRow:
    ids: list[int]  # what generation starts from
    dropped_tokens: int  # cut from the start to leave room for max_new_tokens
    examples_used: int  # primed with this many examples


def prompt_rows(
    texts: list[str],
    encode: Encode,
    special: SpecialIds,
    prompt_format: PromptFormat,
    block_size: int,
    max_new_tokens: int,
    examples: list[tuple[str, str]] | None = None,
    shots: int | None = None,
    examples_source: str = "examples",
    primed_as: PromptFormat = "pair",
) -> list[PromptRow]:
    """The token rows for `texts`: primed with `examples` when given (all of them must fit the
    context with each prompt; with `shots`, the first `shots` that fit), laid out as pairs or,
    with `primed_as` "document", as document text; else in `prompt_format`. Each cut to its last
    `block_size - max_new_tokens` tokens."""
    room = max(block_size - max_new_tokens, 1)
    if examples and primed_as == "document":
        return [
            document_row(text, examples, encode, special, block_size, max_new_tokens, shots, examples_source)
            for text in texts
        ]
    primed = encode_examples(examples, encode) if examples else None
    rows = []
    for text in texts:
        query = encode(text)
        chosen = primed
        if primed and shots is not None:
            chosen = fitting_examples(primed, query, room, limit=shots)
            if not chosen:
                raise UserError(
                    f"{examples_source}: none of its {len(primed)} examples fits the context with the prompt"
                )
        elif primed:
            check_examples_fit(primed, query, room, examples_source)
        ids, dropped = fit_prompt(format_prompt(query, special, prompt_format, chosen), block_size, max_new_tokens)
        rows.append(PromptRow(ids, dropped, len(chosen or [])))
    return rows


def document_row(
    text: str,
    examples: list[tuple[str, str]],
    encode: Encode,
    special: SpecialIds,
    block_size: int,
    max_new_tokens: int,
    shots: int | None,
    examples_source: str,
) -> PromptRow:
    """One prompt primed with `examples` as document text (see `prompt_rows`)."""
    room = max(block_size - max_new_tokens, 1)
    ids, chosen = document_primed_prompt(examples, text, encode, special, room, shots)
    used = len(chosen)
    if used == 0 or (shots is None and used < len(examples)):
        raise UserError(
            f"{examples_source}: only {used} of the {len(examples)} examples fit the context with the prompt "
            f"({room} tokens: block_size minus max_new_tokens); give fewer or shorter examples"
        )
    return PromptRow(*fit_prompt(ids, block_size, max_new_tokens), used)  # cuts only a query longer than the room
