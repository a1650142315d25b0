"""Stopping long stage steps when asked: Ctrl-C (SIGINT), SIGTERM (how Prefect cancels a flow run).

Python turns those signals into an exception in the main thread only, and only once it is
back in Python code. Work on other threads (the shard stage's encoding task runs) or in
native code therefore checks `check_stop()` between batches: `stop_on_signals` sets the
flag the moment a signal arrives, before the main thread's exception unwinds into a thread
pool's shutdown that would otherwise wait for every running batch.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested = threading.Event()


class StopRequested(BaseException):
    """A worker stopped between batches because SIGINT/SIGTERM arrived. A BaseException, like
    KeyboardInterrupt, so no `except Exception` retries or swallows it."""


def check_stop() -> None:
    """Raise StopRequested if a stop was asked for; call it between batches of long work."""
    if _requested.is_set():
        raise StopRequested


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM also set the stop flag that `check_stop` reads;
    the handlers that were there still run (KeyboardInterrupt, Prefect's TerminationSignal, or
    the default action). Only the main thread can install handlers: elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    # A signal the process ignores (SIGINT in a background job) stays ignored.
    previous = {signum: handler for signum in STOP_SIGNALS if (handler := signal.getsignal(signum)) != signal.SIG_IGN}

    def request_stop(signum: int, frame: FrameType | None) -> None:
        _requested.set()
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # the default action (ending the process) as if we were not here
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    for signum in previous:
        signal.signal(signum, request_stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
