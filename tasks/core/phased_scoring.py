"""Continuations scored batch by batch as a phase of a stage, with that phase's progress: the
evaluation's benchmarks, the champion's re-evaluation and fine-tuning's document-primed row
(`model.benchmarks.score_continuations` does the scoring)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.benchmarks import Continuation, Request, score_continuations
from tasks.core.train_progress import phase_steps


def score_requests(
    model: torch.nn.Module,
    requests: Sequence[Request],
    block_size: int,
    batch_size: int,
    phase: tuple[str, str],
) -> list[Continuation]:
    """`score_continuations` of `requests`, `batch_size` per forward pass on the model's device,
    with the progress of `phase` (stage, phase: `phase_progress`)."""
    device = next(model.parameters()).device
    batches = [requests[start : start + batch_size] for start in range(0, len(requests), batch_size)]
    return [
        result
        for batch in phase_steps(*phase, batches, len(batches))
        for result in score_continuations(model, batch, block_size, batch_size, device)
    ]
