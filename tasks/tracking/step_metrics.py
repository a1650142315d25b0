"""The one sink of training step metrics: pretraining in process, every torchrun worker's
rank 0, and fine-tuning all hand the engine's `callback(step, metrics)` this.

Each step goes to the stage's MLflow run (`runs.MetricsLogger`: queued, delivered in the
background, flushed at the end), then to each listener the caller adds (a progress bar, the
progress file a torchrun worker writes for its parent).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from tasks.tracking.runs import MetricsLogger

StepCallback = Callable[[int, Mapping[str, float]], None]


@contextmanager
def step_metrics(run_id: str, *listeners: StepCallback) -> Iterator[StepCallback]:
    """A step callback that logs to run `run_id` and tells `listeners`; every step is stored
    by the time the block ends."""
    with MetricsLogger(run_id) as logger:

        def on_step(step: int, metrics: Mapping[str, float]) -> None:
            logger(step, metrics)
            for listener in listeners:
                listener(step, metrics)

        yield on_step
