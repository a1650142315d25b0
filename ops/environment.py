"""The environment defaults every gptflow entry point applies before Prefect or MLflow starts.

Prefect reads its settings, and MLflow its telemetry switch, when first imported, so the
defaults that make the embedded (ephemeral) server dependable on a small machine must be in
`os.environ` before then. Importing a module of `flows` changes nothing; each entry point
applies them first. The `gptflow` command (`cli.app.main`) calls `set_defaults()`, which
imports nothing: a command that needs no flow starts fast, and one that runs flows binds
Prefect's temporary server when it checks the server (`ops.servers.check_prefect_server`).
The processes that run flows from their start call `apply_defaults()`, both at once: the
module a Prefect worker loads for prefect.yaml's deployment (`flows/deployment.py`) and the
tests' conftest. Flow runs that `gptflow serve` starts inherit its environment.
"""

from __future__ import annotations

import os

from ops.server_state import MLFLOW, PREFECT, recorded_server

DEFAULTS = {
    # The ephemeral API server needs more than the default 20 s to start under load.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # With no network, analytics only produce errors (and a 'database is locked' trace).
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # Progress bars for copying a few local files only clutter the flow's log.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Concurrency leases in files under PREFECT_HOME, not in the granting server's memory, so
    # a killed run's lease outlives the embedded server and can be reclaimed (flows/run/slots.py).
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
    # Training steps logged asynchronously (tasks/tracking/runs.py's MetricsLogger) are merged
    # into one request per this many seconds, rather than one request per step.
    "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS": "2",
}


def apply_defaults() -> None:
    """`set_defaults()`, then, with no Prefect server named, Prefect's ephemeral one bound
    to this process's lifetime (ops/embedded_server.py)."""
    set_defaults()
    # Imported here: Prefect must not be imported before the defaults above are set.
    from ops.embedded_server import bind_embedded_server

    bind_embedded_server()


def set_defaults() -> None:
    """Set each default the environment leaves unset (the environment always wins). With no
    PREFECT_API_URL set, the Prefect server `gptflow up` recorded is used, running or not (a
    run checks that it answers: `ops.servers.check_prefect_server`). Imports neither Prefect
    nor MLflow."""
    for name, value in DEFAULTS.items():
        os.environ.setdefault(name, value)
    hand_over_tracking_server()
    if "PREFECT_API_URL" not in os.environ and (server := recorded_server(PREFECT)):
        os.environ["PREFECT_API_URL"] = server.api_url


def hand_over_tracking_server() -> None:
    """With no MLFLOW_TRACKING_URI set, point tracking (tasks/tracking/runs.py) at the MLflow
    server `gptflow up` started, while it is recorded, even when its process is gone
    (restarting, or crashed): a run then waits for it or fails naming it
    (`check_tracking_server`) instead of tracking into another store unnoticed."""
    if "MLFLOW_TRACKING_URI" not in os.environ and (server := recorded_server(MLFLOW)):
        os.environ["MLFLOW_TRACKING_URI"] = server.api_url
