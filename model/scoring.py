"""Evaluation math: loss, perplexity, bits per byte, next-token accuracy, sliding windows.

Everything here sums per-token quantities into `LossTotals` and derives the figures from
the sums at the end, so batches of any size (and padded batches) give the same result as
one big batch. A target of -100 is not scored, as in `GPT.forward` and PyTorch's
cross-entropy.

Bits per byte makes runs with different tokenizers comparable: the summed loss in nats over
the scored target tokens divided by (ln 2 x the UTF-8 byte length of those target tokens),
each token's bytes as the tokenizer decodes it and special tokens counting 0 bytes. The
caller supplies those byte lengths as a tensor indexed by token id.

Sliding-window perplexity over whole documents follows the Hugging Face "perplexity of
fixed-length models" method: windows of up to `block_size` inputs start every `stride`
tokens, and each window scores only the targets no earlier window scored, so every token is
scored exactly once, with between `block_size - stride + 1` and `block_size` tokens of
context (fewer at the start of the document).

Which val windows are scored: `val_windows` picks them, for the engine's validation during
training and for the evaluate stage alike, so that the last point of the training curve is
the evaluate stage's `val_loss` on that checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.data import WindowLoader
from model.device import inference_autocast
from model.integrity import MANIFEST

IGNORE = -100  # target value that is not scored

# Val windows scored by default, in training-time validation and in the evaluate stage. A window's mean
# loss varies across windows with a standard deviation of about 0.9 nats (the tiny preset, 4 x 256,
# after 250 steps), so the mean of 8,192 windows has a standard error below 0.01 nats. A smaller split is
# scored whole: the embedded default's has 569 windows, and its figure is exact.
VAL_WINDOWS = 8192


@dataclass
class LossTotals:
    """Sums over scored target tokens; every reported figure derives from these."""

    nats: float = 0.0  # summed cross-entropy, natural log
    tokens: int = 0  # scored targets
    bytes: int = 0  # UTF-8 bytes of the scored targets
    correct: int = 0  # targets that were the model's top-1 prediction

    def __iadd__(self, other: LossTotals) -> LossTotals:
        self.nats += other.nats
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.correct += other.correct
        return self

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nats / (math.log(2) * self.bytes) if self.bytes else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else math.nan

    def figures(self, prefix: str) -> dict[str, float]:
        """The named metrics, e.g. prefix "val" -> val_loss, val_perplexity, ..."""
        return {
            f"{prefix}_loss": self.loss,
            f"{prefix}_perplexity": self.perplexity,
            f"{prefix}_bits_per_byte": self.bits_per_byte,
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_tokens": float(self.tokens),
        }


@torch.no_grad()
def score_batch(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, byte_lengths: torch.Tensor
) -> LossTotals:
    """Totals for one batch: inputs (B, T) token ids, targets (B, T) ids or IGNORE.

    On a GPU the matmuls run in bf16 autocast; the logits and the loss sum stay fp32."""
    with inference_autocast(inputs.device):
        logits = model(inputs, fp32_logits=True).logits  # (B, T, V)
    flat_logits = logits.flatten(0, 1).float()  # (B*T, V)
    flat_targets = targets.flatten()  # (B*T,)
    scored = flat_targets != IGNORE
    nats = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE, reduction="sum")
    kept = flat_targets[scored]
    return LossTotals(
        nats=nats.item(),
        tokens=int(scored.sum()),
        bytes=int(byte_lengths.to(kept.device)[kept].sum()),
        correct=int((flat_logits[scored].argmax(dim=-1) == kept).sum()),
    )


def score_batches(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    device: torch.device | str = "cpu",
) -> LossTotals:
    """Totals over (inputs, targets) batches, e.g. the val shards' windows."""
    totals = LossTotals()
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            totals += score_batch(model, inputs.to(device), targets.to(device), byte_lengths)
    finally:
        model.train(was_training)
    return totals


def sliding_windows(tokens: list[int], block_size: int, stride: int) -> Iterator[tuple[list[int], list[int]]]:
    """(inputs, targets) windows over one token sequence, each target scored exactly once.

    Target j (predicting tokens[j], j >= 1) is scored in the first window that reaches it;
    window k starts at token k * stride and holds up to `block_size` inputs. Targets an
    earlier window already scored are IGNORE. With stride == block_size the windows are
    disjoint chunks.
    """
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be between 1 and block_size ({block_size}), got {stride}")
    last = len(tokens) - 1  # index of the last target
    scored_up_to = 0  # targets 1..scored_up_to are done
    begin = 0
    while scored_up_to < last:
        end = min(begin + block_size, last)  # inputs tokens[begin:end], targets tokens[begin+1:end+1]
        targets = tokens[begin + 1 : end + 1]
        already = scored_up_to - begin  # the first `already` targets were scored before
        targets = [IGNORE] * already + targets[already:]
        yield tokens[begin:end], targets
        scored_up_to = end
        begin += stride


def pad_batch(windows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length windows: inputs with their own last token, targets with IGNORE.

    The model is causal, so padding after a window never changes the logits inside it, and
    the pad positions are not scored: any id does, and repeating a real one needs no
    tokenizer here.
    """
    width = max(len(inputs) for inputs, _ in windows)
    inputs = torch.empty((len(windows), width), dtype=torch.long)
    targets = torch.full((len(windows), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(windows):
        inputs[row] = x[-1]
        inputs[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[row, : len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


def sliding_window_batches(
    documents: Iterable[list[int]], block_size: int, stride: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Padded batches of the sliding windows of many documents."""
    pending: list[tuple[list[int], list[int]]] = []
    for tokens in documents:
        for window in sliding_windows(tokens, block_size, stride):
            pending.append(window)
            if len(pending) == batch_size:
                yield pad_batch(pending)
                pending = []
    if pending:
        yield pad_batch(pending)


def evenly_spaced(total: int, limit: int | None) -> torch.Tensor:
    """Indices of at most `limit` of `total` rows, from the first to the last at even steps
    (the whole split, not just its first documents); all of them when `limit` is None or larger."""
    if limit is None or total <= limit:
        return torch.arange(total)
    return torch.linspace(0, total - 1, limit).round().long()


def val_windows(shards: Path, limit: int | None = VAL_WINDOWS) -> torch.Tensor:
    """The val split's scored windows, (N, seq_len + 1): `limit` evenly spaced ones (None: all),
    the same ones on every call. `shards` is the shard directory or its manifest.json."""
    shards = Path(shards)
    loader = WindowLoader(shards / MANIFEST if shards.is_dir() else shards, "val", batch_size=1, shuffle=False)
    picked = [loader.source.windows(int(index), 1) for index in evenly_spaced(loader.num_windows, limit)]
    return torch.from_numpy(np.concatenate(picked).astype(np.int64))


def window_batches(
    windows: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (inputs, targets) batches, (B, T) each, of `windows` (N, T + 1): each run of
    batch_size x world_size windows is dealt out to the ranks in order. With several ranks, every
    rank gets the same number of full batches, the last ones padded with rows that score nothing
    (inputs repeating a real token, as in `pad_batch`), because under FSDP each forward pass
    gathers the weights from all ranks."""
    group = batch_size * world_size
    for start in range(0, len(windows), group):
        rows = windows[start + rank * batch_size : min(start + (rank + 1) * batch_size, start + group)]
        inputs, targets = rows[:, :-1], rows[:, 1:]
        if world_size > 1 and len(rows) < batch_size:
            missing = batch_size - len(rows)
            inputs = torch.cat([inputs, windows[:1, :-1].expand(missing, -1)])
            targets = torch.cat([targets, torch.full((missing, targets.size(1)), IGNORE, dtype=targets.dtype)])
        yield inputs, targets
