"""Child processes that a test stops with SIGINT, as Ctrl-C would.

A shell starts a background job (`pytest ... &`) or a `nohup` command with SIGINT ignored,
and an ignored signal stays ignored across fork and exec: a child of such a test session
would shrug off the test's SIGINT (a training run then goes on to its last step and exits 0).
So a test starts such a child as `with_sigint(command)`: a Python trampoline that sets SIGINT
back to its default and execs `command` in the same process (same pid), whose Python then
turns SIGINT into KeyboardInterrupt as usual. The trampoline is hand-written because
`subprocess` resets only SIGPIPE, SIGXFZ and SIGXFSZ, and its `preexec_fn` is unsafe in a
process with threads (the session's Prefect server runs in one).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

_RESTORE_SIGINT_THEN_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])"
)


def with_sigint(command: Sequence[str]) -> list[str]:
    """`command` (a program and its arguments) started with SIGINT at its default disposition."""
    return [sys.executable, "-c", _RESTORE_SIGINT_THEN_EXEC, *command]
