"""Replay: pretraining windows mixed into fine-tuning batches.

Fine-tuning on a narrow task alone pulls a small model away from the language it was
pretrained on (its general val loss rises). Replaying a share of pretraining windows in
every batch keeps that loss in view. `ReplayBatches` joins two `Batches` streams (see
model.train): each micro-batch is the pairs' rows followed by the shards' windows, cut or
padded to the pairs' row length. Its state is both streams' positions, so a resumed run
draws exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from model.scoring import IGNORE
from model.train import Batches


def replay_rows(fraction: float, batch_size: int) -> int:
    """Rows of a `batch_size`-row micro-batch given to pretraining windows: the nearest to
    `fraction`, at least one when replay is on, and at least one row left for the task."""
    if fraction <= 0:
        return 0
    return min(batch_size - 1, max(1, round(fraction * batch_size)))


def fit_rows(inputs: torch.Tensor, targets: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) rows as (B, seq_len): the first seq_len positions, or padded with unscored
    targets and inputs repeating each row's last token (as `model.scoring.pad_batch` does:
    the model is causal, so nothing after a row's end changes its logits)."""
    missing = seq_len - inputs.size(1)
    if missing <= 0:
        return inputs[:, :seq_len], targets[:, :seq_len]
    pad = (len(inputs), missing)
    return (
        torch.cat([inputs, inputs[:, -1:].expand(pad)], dim=1),
        torch.cat([targets, torch.full(pad, IGNORE, dtype=targets.dtype)], dim=1),
    )


class ReplayBatches:
    """`task` rows then `replay` windows in every batch, (task.batch_size + replay.batch_size, task.seq_len)."""

    def __init__(self, task: Batches, replay: Batches):
        self.task, self.replay = task, replay
        self.batch_size = task.batch_size + replay.batch_size
        self.seq_len = task.seq_len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for (task_inputs, task_targets), (windows, window_targets) in zip(self.task, self.replay):
            replay_inputs, replay_targets = fit_rows(windows, window_targets, self.seq_len)
            yield torch.cat([task_inputs, replay_inputs]), torch.cat([task_targets, replay_targets])

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task.state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.task.load_state_dict(state["task"])
        self.replay.load_state_dict(state["replay"])
