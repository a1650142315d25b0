"""The state file `gptflow up` writes: which local Prefect and MLflow servers are running.

`gptflow up` records each server's PID, API address and UI address in
`$GPTFLOW_HOME/servers.json` (`~/.gptflow` by default); the entry points read it
(ops/environment.py) to use those servers when the environment names none. Each record is
followed while it exists, its server alive, dead or restarting, so that no run lands silently
in another store or an ephemeral Prefect server (`gptflow down` forgets it).
This module only reads and writes the file; starting and stopping lives in
`ops/servers.py`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

PREFECT = "prefect"
MLFLOW = "mlflow"


@dataclass(frozen=True)
class ServerRecord:
    pid: int
    api_url: str  # what clients talk to: PREFECT_API_URL or MLFLOW_TRACKING_URI
    ui_url: str  # what a person opens in a browser
    log_file: str


def gptflow_home() -> Path:
    return Path(os.environ.get("GPTFLOW_HOME") or Path.home() / ".gptflow")


def state_file() -> Path:
    return gptflow_home() / "servers.json"


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_records() -> dict[str, ServerRecord]:
    """Every recorded server, alive or not (what `gptflow down` must stop)."""
    try:
        data = json.loads(state_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {kind: ServerRecord(**fields) for kind, fields in data.items()}


def recorded_server(kind: str) -> ServerRecord | None:
    """The server of `kind` that `gptflow up` started, running or not."""
    return read_records().get(kind)


def write_records(records: dict[str, ServerRecord]) -> None:
    # Imported here: every command reads the file at start-up, only `up` and `down` write it,
    # and tasks.core.workspace brings pyarrow (0.4 s).
    from tasks.core.workspace import write_json_atomic

    if records:
        write_json_atomic(state_file(), {kind: asdict(r) for kind, r in records.items()})
    else:
        state_file().unlink(missing_ok=True)
