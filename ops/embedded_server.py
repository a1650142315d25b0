"""The embedded Prefect server lives no longer than the process that started it.

With no server configured, Prefect starts a temporary API server (uvicorn) in a subprocess
the first time a flow needs one, and stops it at exit (`atexit`). A process killed with
SIGKILL (the OOM killer, a crash) runs no exit handler, and its server, about 250 MB, was left
running for ever. Prefect keeps one such server per process, `SubprocessASGIServer()`, a
singleton per port; `bind_embedded_server()` puts a subclass in its place that pairs the
server with a watchman: a small process that waits for the end of a pipe which only this
process holds open, and stops the server when the pipe closes, however this process ended.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from prefect.server.api.server import SubprocessASGIServer

# Blocks until the pipe from the starting process closes (it exited, however), then stops the
# server: SIGTERM, and SIGKILL if it is still there 5 s later.
WATCHMAN = """
import os, signal, sys, time
pid = int(sys.argv[1])
sys.stdin.buffer.read()
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        break
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(0)
        time.sleep(0.1)
"""


class ProcessBoundServer(SubprocessASGIServer):
    """Prefect's temporary server, stopped by a watchman when the process that started it ends."""

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        server = super()._run_uvicorn_command()
        # The watchman's stdin is a pipe whose writing end only this process holds (Popen
        # closes inherited descriptors by default); its own session keeps it out of signals
        # sent to ours, so it outlives us to do its job.
        self.watchman = subprocess.Popen(
            [sys.executable, "-c", WATCHMAN, str(server.pid)], stdin=subprocess.PIPE, start_new_session=True
        )
        return server


def bind_embedded_server() -> None:
    """With no PREFECT_API_URL set, make the temporary server Prefect starts in this process
    (port chosen by Prefect) a `ProcessBoundServer`; nothing starts until a flow needs it."""
    if "PREFECT_API_URL" not in os.environ and None not in SubprocessASGIServer._instances:
        ProcessBoundServer()  # registers itself as the instance for "any port"
