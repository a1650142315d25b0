"""Priming against fine-tuning: the pretrained model prompted with a few examples (GPT-3's
few-shot priming, Brown et al. 2020), scored on the held-out pairs like the fine-tuned model.

Each held-out pair is primed with the first `priming_shots` train pairs, in the stage's seeded
order (`priming_order`), that fit the row with the query and the body's budget (the longer of
its completion and `eval_max_new_tokens`): `p1 <|sep|> c1 <|endoftext|> ... query <|sep|>`
(model/prompts.py). Scored as the zero-shot and fine-tuned rows are: the completion loss (its
completion and closing `<|endoftext|>`, the examples unscored) and the parse rate of the
greedily generated bodies. `primed_examples` is the mean number of examples that fit.

The `<|sep|>` row is unfair to a pretrained model, which never saw `<|sep|>`. The document row
(`primed_document_*`) primes it as GPT-3 primed its pretrained models: the examples and the query
as plain text, each prompt then its completion with a blank line after it
(`<|endoftext|> p1 c1 (blank line) ... query`, model/prompts.py), encoded whole as the corpus
was. Its completion is scored as the continuation of that text (split as lm-eval splits it,
model/benchmarks.py) with the closing `<|endoftext|>`; its generated bodies end where the
function ends (the first line back at column 0: the next example the model goes on to write).
"""

from __future__ import annotations

import random

import torch

from model.benchmarks import Request, encode_request
from model.finetune_data import TooLong, encode_pair, to_rows
from model.generate import few_shot_prompt
from model.prompts import Encode, document_lengths, document_primed_prompt, document_text, fitting_examples
from model.special_tokens import SpecialIds
from tasks.finetune_pairs import Pair

Tokenized = list[tuple[list[int], list[int]]]


def priming_order(pairs: list[Pair], seed: int) -> list[Pair]:
    """The train pairs in the order priming draws them: shuffled with the stage's seed."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    return [pairs[i] for i in order]


def primed_layouts(
    examples: Tokenized, held_out: Tokenized, shots: int, seq_len: int, max_new_tokens: int, special: SpecialIds
) -> list[tuple[list[int], int]]:
    """Per held-out pair: its primed prompt (ending `query <|sep|>`) and the number of examples in it."""
    layouts = []
    for query, completion in held_out:
        budget = max(len(completion) + 1, max_new_tokens)
        chosen = fitting_examples(examples, query, seq_len - budget, limit=shots)
        layouts.append((few_shot_prompt(chosen, query, special), len(chosen)))
    return layouts


def primed_rows(
    layouts: list[tuple[list[int], int]], held_out: Tokenized, seq_len: int, too_long: TooLong, special: SpecialIds
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the primed pairs, one per row: the primed prompt, then the completion,
    which alone is scored (its `<|sep|>` comes from `encode_pair`)."""
    examples = []
    for (prompt, _), (_, completion) in zip(layouts, held_out):
        example = encode_pair(prompt[:-1], completion, seq_len, too_long, special)
        if example is not None:
            examples.append(example)
    return to_rows(examples, seq_len, packed=False, special=special)


def document_requests(
    examples: list[Pair],
    held_out: list[Pair],
    encode: Encode,
    shots: int,
    seq_len: int,
    max_new_tokens: int,
    special: SpecialIds,
) -> list[tuple[Request, int]]:
    """Per held-out pair: (primed prompt ids, completion ids + `<|endoftext|>`) as document text,
    and the number of examples in it. The prompt keeps room for the longer of the completion and
    `max_new_tokens`, as the `<|sep|>` row's does."""
    shown = [(pair.prompt, pair.completion) for pair in examples]
    lengths = document_lengths(shown, encode)
    requests = []
    for pair in held_out:
        budget = max(len(encode(pair.completion)) + 1, max_new_tokens)
        room = seq_len - budget
        _, chosen = document_primed_prompt(shown, pair.prompt, encode, special, room, limit=shots, lengths=lengths)
        context, completion = encode_request(encode, document_text(chosen, pair.prompt), pair.completion, special.eos)
        requests.append((([special.eos, *context], [*completion, special.eos]), len(chosen)))
    return requests


def function_body(prompt: str, text: str) -> str:
    """The text generated after `prompt` up to where the function ends: the first non-blank line
    that starts at column 0 (a document-primed model goes on to write the next example)."""
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        starts_a_line = number > 0 or prompt.endswith("\n")
        if starts_a_line and line.strip() and not line[0].isspace():
            return "".join(lines[:number])
    return text
