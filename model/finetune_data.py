"""Prompt/completion pairs as training rows for the engine (`model.train.Batches`).

One pair is the token sequence

    prompt <|sep|> completion <|endoftext|>

and the loss is taken only on the completion tokens and the closing <|endoftext|>: the
target of every position whose next token belongs to the prompt (or is the separator) is
-100. A pair must fit a row of `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]);
a longer one loses prompt tokens from its left ("truncate") or is dropped ("drop"), and
one whose completion alone does not fit is always dropped. Both are counted.

Rows hold whole pairs only, so a completion always sees its prompt: packed, consecutive
pairs share a row while they fit; unpacked, each pair has a row of its own. The rest of a
row is <|pad|> with target -100.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from model.scoring import IGNORE
from model.special_tokens import SpecialIds

TooLong = Literal["truncate", "drop"]


@dataclass
class Example:
    tokens: list[int]
    scored: list[bool]  # scored[i]: token i is a loss target (completion or closing <|endoftext|>)


@dataclass
class EncodeReport:
    pairs: int = 0  # kept
    truncated: int = 0  # kept with the prompt cut from the left
    dropped: int = 0


def encode_pair(
    prompt: list[int], completion: list[int], seq_len: int, too_long: TooLong, special: SpecialIds
) -> Example | None:
    """The example for one tokenized pair, fitted to `seq_len + 1` tokens; None if dropped."""
    excess = len(prompt) + len(completion) + 2 - (seq_len + 1)
    if excess > 0:
        if too_long == "drop" or excess > len(prompt):
            return None
        prompt = prompt[excess:]
    tokens = [*prompt, special.sep, *completion, special.eos]
    scored = [False] * (len(prompt) + 1) + [True] * (len(completion) + 1)
    return Example(tokens, scored)


def encode_pairs(
    pairs: list[tuple[list[int], list[int]]], seq_len: int, too_long: TooLong, special: SpecialIds
) -> tuple[list[Example], EncodeReport]:
    examples, report = [], EncodeReport()
    for prompt, completion in pairs:
        example = encode_pair(prompt, completion, seq_len, too_long, special)
        if example is None:
            report.dropped += 1
            continue
        report.pairs += 1
        report.truncated += len(example.tokens) < len(prompt) + len(completion) + 2
        examples.append(example)
    return examples, report


def to_rows(
    examples: list[Example], seq_len: int, packed: bool, special: SpecialIds
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (rows, seq_len): examples laid out in rows of `seq_len + 1` tokens."""
    rows: list[Example] = []
    for example in examples:
        if packed and rows and len(rows[-1].tokens) + len(example.tokens) <= seq_len + 1:
            rows[-1].tokens += example.tokens
            rows[-1].scored += example.scored
        else:
            rows.append(Example(list(example.tokens), list(example.scored)))
    inputs = torch.full((len(rows), seq_len), special.pad, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    for r, row in enumerate(rows):
        tokens = torch.tensor(row.tokens, dtype=torch.long)
        scored = torch.tensor(row.scored[1:], dtype=torch.bool)  # target i is token i + 1
        inputs[r, : len(tokens) - 1] = tokens[:-1]
        targets[r, : len(tokens) - 1] = torch.where(scored, tokens[1:], IGNORE)
    return inputs, targets


class PairBatches:
    """The engine's data source over fixed rows: (inputs, targets) batches of `batch_size` rows.

    With `shuffle`, the rows form an endless stream, a seeded permutation per epoch, and
    process `rank` of `world_size` takes the `rank`-th batch of every `world_size`
    consecutive ones; the state is one position in that global stream, so a resumed run
    continues with exactly the batches an uninterrupted one would have drawn. Without
    `shuffle` (validation) each `iter()` is one pass over this rank's rows, in order.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if len(inputs) == 0:
            raise ValueError("no rows to draw batches from")
        self.inputs, self.targets = inputs, targets
        self.batch_size, self.seq_len = batch_size, inputs.shape[1]
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.position = 0  # rows of the global stream consumed by all ranks together
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation), memoized

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.shuffle:
            mine = torch.arange(len(self.inputs))[self.rank :: self.world_size]
            for start in range(0, len(mine), self.batch_size):
                rows = mine[start : start + self.batch_size]
                yield self.inputs[rows], self.targets[rows]
            return
        while True:
            start = self.position + self.rank * self.batch_size
            rows = torch.stack([self.stream_row(k) for k in range(start, start + self.batch_size)])
            self.position += self.world_size * self.batch_size
            yield self.inputs[rows], self.targets[rows]

    def stream_row(self, k: int) -> torch.Tensor:
        """The row at position k of the endless shuffled stream."""
        epoch, index = divmod(k, len(self.inputs))
        if self._order is None or self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(len(self.inputs), generator=generator))
        return self._order[1][index]
