"""How far a training or evaluation stage is, shown where its watchers look (the data stages
count documents, bytes and tokens instead: tasks/core/progress.py).

A `StageProgress` shows one stage's steps three ways at once:
- in a terminal, a rich progress bar with the step, the latest figures and the time left;
- when output is not a terminal (a log file, a worker's pipe), a plain line every
  `PLAIN_EVERY` steps, on a validation step and at the end; for a phase of few slow steps
  (`phase_progress`: fine-tuning's held-out scoring, evaluation's val windows, documents,
  benchmarks and samples, registration's re-evaluation of the champion), one as it starts,
  after its first step, every `PHASE_LINE_SECONDS` and at the end, each with the phase's own
  time left;
- inside a Prefect task run, a progress artifact on the task run (the flow run page shows
  each stage's percentage), updated at most every `ARTIFACT_SECONDS`.

Under torchrun the ranks do not talk to Prefect: rank 0 writes its latest step to a small
JSON file (`write_progress_file`) and the task's process reads it while it waits for the
launcher (`ProgressFileReader`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

T = TypeVar("T")

PLAIN_EVERY = 10
PHASE_LINE_SECONDS = 10.0
ARTIFACT_SECONDS = 2.0
# The figures a bar or line shows, in this order, when a step reports them.
SHOWN = ("loss", "val_loss", "tokens_per_s")


def format_figures(figures: Mapping[str, float]) -> str:
    return " ".join(f"{name} {figures[name]:.4g}" for name in SHOWN if name in figures)


class StageProgress:
    """Progress of one stage's `total` steps; `update(step, figures)` after each, or `track(items, total)`.

    `key` names the Prefect artifact (lowercase letters, digits, dashes); `log` receives the
    plain lines (a Prefect run logger's `info`, or `print`); with `line_seconds`, a plain line
    comes at the start, after the first step, every `line_seconds` and at the end instead.
    """

    def __init__(
        self,
        key: str,
        description: str,
        total: int,
        log: Callable[[str], object] = print,
        line_seconds: float | None = None,
    ):
        self.key, self.description, self.total, self.log = key, description, total, log
        self.line_seconds = line_seconds
        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=not self.console.is_terminal,
        )
        self.bar_task = self.bar.add_task(description, total=total, figures="")
        self.started = self.last_line = time.monotonic()
        self.first_update: tuple[float, int] | None = None  # (when, step) of the first step reported
        self.artifact_id = None
        self.artifact_updated = -ARTIFACT_SECONDS
        self.last_step = 0

    def __enter__(self) -> StageProgress:
        self.bar.start()
        if self.bar.disable and self.line_seconds is not None:  # what the wait is for, before its first step
            self.log(f"{self.description} 0/{self.total}")
        # A Prefect artifact belongs to a task run: outside one (a plain function call) there is none.
        if TaskRunContext.get() is not None:
            self.artifact_id = create_progress_artifact(0.0, key=self.key, description=self.description)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.stop()
        self._update_artifact(force=True)

    def update(self, step: int, figures: Mapping[str, float] | None = None) -> None:
        figures = figures or {}
        if self.first_update is None:
            self.first_update = (time.monotonic(), step)
        self.last_step = step
        self.bar.update(self.bar_task, completed=step, figures=format_figures(figures))
        if self.bar.disable and self._line_due(step, figures):
            shown = format_figures(figures)
            self.log(f"{self.description} {step}/{self.total}{': ' + shown if shown else ''}{self._time_left(step)}")
            self.last_line = time.monotonic()
        self._update_artifact(force=step == self.total)

    def _line_due(self, step: int, figures: Mapping[str, float]) -> bool:
        if self.line_seconds is None:
            return step % PLAIN_EVERY == 0 or step == self.total or "val_loss" in figures
        return step in (1, self.total) or time.monotonic() - self.last_line >= self.line_seconds

    def track(self, items: Iterable[T], total: int) -> Iterator[T]:
        """Yield `total` `items`, counting each as one step done once the caller asks for the next."""
        self.total = total
        self.bar.update(self.bar_task, total=total)
        for step, item in enumerate(items, start=1):
            yield item
            self.update(step)

    def _time_left(self, step: int) -> str:
        """The time left at the pace of the steps since the first one reported: what came
        before (loading, compiling, a resumed run's earlier steps, the held-out scoring before
        fine-tuning's training) is not this progress's pace. At its first step a phase, which
        starts just before it, counts from its start; training has no pace yet."""
        if step <= 0 or step >= self.total:
            return ""
        since, first_step = self.first_update or (self.started, 0)
        if step > first_step:
            seconds = (time.monotonic() - since) / (step - first_step) * (self.total - step)
        elif self.line_seconds is not None:
            seconds = (time.monotonic() - self.started) / step * (self.total - step)
        else:
            return ""
        return f" (about {seconds:.0f} s left)"

    def _update_artifact(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.artifact_id is None or not (force or now - self.artifact_updated >= ARTIFACT_SECONDS):
            return
        self.artifact_updated = now
        percent = 100.0 * self.last_step / self.total if self.total else 100.0
        update_progress_artifact(self.artifact_id, percent)


def training_progress(stage: str, max_steps: int, log: Callable[[str], object] = print) -> StageProgress:
    return StageProgress(f"{stage}-progress", f"{stage} step", max_steps, log)


def phase_progress(stage: str, phase: str, total: int, log: Callable[[str], object] = print) -> StageProgress:
    """One phase of a stage's work outside its training steps (`total` batches), with its own
    lines and time left: "finetune: parse rate, pretrained 1/2 (about 40 s left)"."""
    key = re.sub(r"[^a-z0-9]+", "-", f"{stage}-{phase}".lower()).strip("-")
    return StageProgress(key, f"{stage}: {phase}", total, log, line_seconds=PHASE_LINE_SECONDS)


def phase_steps(stage: str, phase: str, items: Iterable[T], total: int) -> Iterator[T]:
    """`items` (`total` of them: a phase's batches), its progress shown as the phase's
    (`phase_progress`): a step done when the next item is asked for."""
    with phase_progress(stage, phase, total) as progress:
        yield from progress.track(items, total)


def write_progress_file(path: Path, step: int, metrics: Mapping[str, float]) -> None:
    """Rank 0's latest step, replaced atomically so that a reader never sees half a file."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"step": step, "metrics": dict(metrics)}))
    os.replace(partial, path)


class ProgressFileReader:
    """Reads rank 0's progress file; `poll()` hands each newer step to `callback(step, metrics)`."""

    def __init__(self, path: Path, callback: Callable[[int, Mapping[str, float]], None]):
        self.path, self.callback, self.step = path, callback, 0

    def poll(self) -> None:
        try:
            latest = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet
            return
        if latest["step"] > self.step:
            self.step = latest["step"]
            self.callback(latest["step"], latest["metrics"])
