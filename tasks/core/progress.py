"""Progress of the data stages: documents, bytes, tokens and time left, so a slow stage is
visibly slow. A rich progress bar on stderr when someone watches a terminal; otherwise (logs,
pipes, a Prefect worker) a plain line every `LOG_EVERY_SECONDS` and one when the step ends.

Several steps may count at once (the shard stage's chunks run on threads): they share one
rich display, one row each.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LOG_EVERY_SECONDS = 10.0

_lock = threading.Lock()
_display: Progress | None = None  # the shared rich display while any step counts in a terminal
_open_steps = 0


def size_text(n_bytes: float) -> str:
    if n_bytes < 1000:
        return f"{n_bytes:.0f} B"
    for unit in ("KB", "MB"):
        n_bytes /= 1000
        if n_bytes < 1000:
            return f"{n_bytes:.1f} {unit}"
    return f"{n_bytes / 1000:.1f} GB"


class StepProgress:
    """The counts of one step; `advance` after each batch (from any one thread)."""

    def __init__(self, description: str, total_documents: int | None, display: Progress | None):
        self.description, self.total = description, total_documents
        self.documents = self.bytes = self.tokens = 0
        self._display = display
        self._task: TaskID | None = None
        self._started = self._logged = time.monotonic()
        if display is not None:
            self._task = display.add_task(description, total=total_documents, size="0 B", tokens=0)

    def advance(self, documents: int = 0, n_bytes: int = 0, tokens: int = 0) -> None:
        self.documents += documents
        self.bytes += n_bytes
        self.tokens += tokens
        if self._task is not None:
            self._display.update(self._task, advance=documents, size=size_text(self.bytes), tokens=self.tokens)
        elif time.monotonic() - self._logged >= LOG_EVERY_SECONDS:
            self.log()

    def log(self, done: bool = False) -> None:
        self._logged = time.monotonic()
        elapsed = self._logged - self._started
        of_total = f"/{self.total:,}" if self.total is not None else ""
        line = f"{self.description}: {self.documents:,}{of_total} documents, {size_text(self.bytes)}"
        if self.tokens:
            line += f", {self.tokens:,} tokens"
        line += f", {elapsed:.0f} s"
        if done:
            line += ", done"
        elif self.total and self.documents:
            line += f", ~{elapsed * (self.total - self.documents) / self.documents:.0f} s left"
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._task is not None:
            self._display.remove_task(self._task)
        else:
            self.log(done=True)


@contextmanager
def step_progress(description: str, total_documents: int | None = None) -> Iterator[StepProgress]:
    """Count a step's documents, bytes and tokens while the block runs; time left comes
    from `total_documents` when known."""
    global _display, _open_steps
    console = Console(stderr=True)
    with _lock:
        if console.is_terminal and _display is None:
            _display = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f} documents"),
                TextColumn("{task.fields[size]}"),
                TextColumn("{task.fields[tokens]:,} tokens"),
                TimeElapsedColumn(),
                TextColumn("left"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            _display.start()
        _open_steps += 1
        step = StepProgress(description, total_documents, _display)
    try:
        yield step
    finally:
        with _lock:
            step.close()
            _open_steps -= 1
            if _open_steps == 0 and _display is not None:
                _display.stop()
                _display = None
