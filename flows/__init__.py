"""Prefect flows and the `gptflow` command line.

Prefect reads its settings when it is first imported, so the defaults that make the
embedded (ephemeral) server dependable on a small machine are set here, before any
module of this package imports prefect. The environment always wins; with no
PREFECT_API_URL set, a Prefect server started by `gptflow up` is used, else Prefect's
ephemeral one.
"""

import os

for _name, _value in {
    # The ephemeral API server needs more than the default 20 s to start under load.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # With no network, analytics only produce errors (and a 'database is locked' trace).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Progress bars for copying a few local files only clutter the flow's log.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}.items():
    os.environ.setdefault(_name, _value)

if "PREFECT_API_URL" not in os.environ:
    from tasks.core.server_state import PREFECT, live_server

    if _server := live_server(PREFECT):
        os.environ["PREFECT_API_URL"] = _server.api_url
