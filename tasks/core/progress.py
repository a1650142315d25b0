"""Progress bars for long stage steps, drawn only when someone watches a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import track

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: float | None = None) -> Iterator[T]:
    """Iterate `items` with a transient rich progress bar on stderr (none in logs or pipes)."""
    console = Console(stderr=True)
    yield from track(
        items,
        description=description,
        total=total,
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
