"""A job repeated in a background thread while a block runs: checkpoint uploads, figure refreshes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def repeating(
    job: Callable[[], object], seconds: float, name: str, forgiven: type[Exception] | tuple[type[Exception], ...]
) -> Iterator[None]:
    """Call `job` every `seconds` while the block runs (not at the end: the caller does the last
    pass itself). A `forgiven` error (a server briefly away) is logged as a warning and the next
    pass tries again, so the work in the block goes on."""
    stopped = threading.Event()

    def repeat() -> None:
        while not stopped.wait(seconds):
            try:
                job()
            except forgiven as e:
                logging.getLogger(__name__).warning("%s: %s", name, str(e).splitlines()[0] if str(e) else e)

    thread = threading.Thread(target=repeat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()
