"""Priming against fine-tuning: the pretrained model prompted with a few examples (GPT-3's
few-shot priming, Brown et al. 2020), scored on the held-out pairs like the fine-tuned model.

Each held-out pair is primed with the first `priming_shots` train pairs, in the stage's seeded
order (`priming_order`), that fit the row with the query and the body's budget (the longer of
its completion and `eval_max_new_tokens`): `p1 <|sep|> c1 <|endoftext|> ... query <|sep|>`
(model/prompts.py). Scored as the zero-shot and fine-tuned rows are: the completion loss (its
completion and closing `<|endoftext|>`, the examples unscored) and the parse rate of the
greedily generated bodies. `primed_examples` is the mean number of examples that fit.
"""

from __future__ import annotations

import random

import torch

from model.finetune_data import TooLong, encode_pair, to_rows
from model.generate import few_shot_prompt
from model.prompts import fitting_examples
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
