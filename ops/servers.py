"""`gptflow up` / `gptflow down`: a real Prefect server and MLflow server on this machine.

Both run as plain local processes, each in its own process group (so stopping one stops
its workers too) with its output in a log file under `$GPTFLOW_HOME/logs`. `up` waits
until both answer their health checks, then records PIDs and addresses in the state file
(`ops/server_state.py`) that `gptflow run` reads. MLflow keeps its runs in
`<data_dir>/mlflow.db` and artifacts in `<data_dir>/mlartifacts`; with the default data
dir, the working directory, that is the same database the embedded default writes, so
runs made before `gptflow up` show in its UI. Prefect keeps its database under
PREFECT_HOME, as the ephemeral server does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from model.errors import UserError
from ops.server_state import (
    MLFLOW,
    PREFECT,
    ServerRecord,
    gptflow_home,
    is_alive,
    read_records,
    recorded_server,
    write_records,
)

HOST = "127.0.0.1"


def prefect_command(port: int) -> list[str]:
    return [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(port)]


def mlflow_command(port: int, data_dir: Path) -> list[str]:
    return [
        _bin("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{data_dir / 'mlflow.db'}",
        "--artifacts-destination",
        str(data_dir / "mlartifacts"),
        "--workers",
        "1",
    ]


def _bin(name: str) -> str:
    """The console script installed next to this Python (the venv's, not a global one)."""
    return str(Path(sys.executable).parent / name)


def up(
    prefect_port: int = 4200, mlflow_port: int = 5000, data_dir: Path = Path("."), timeout: float = 180.0
) -> dict[str, ServerRecord]:
    """Start both servers (unless `gptflow up` already did), wait until healthy, record them."""
    running = read_records()
    if running and all(is_alive(r.pid) for r in running.values()) and set(running) == {PREFECT, MLFLOW}:
        return running
    if running:
        down()  # half of a previous `up` survived: start over cleanly
    for port in (prefect_port, mlflow_port):
        _require_free_port(port)

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = gptflow_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefect_url, mlflow_url = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"
    # The Prefect UI finds its API through PREFECT_UI_API_URL, which does not follow --port.
    prefect_env = {"PREFECT_UI_API_URL": f"{prefect_url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    records = {
        PREFECT: _spawn(
            prefect_command(prefect_port), logs / "prefect.log", f"{prefect_url}/api", prefect_url, prefect_env
        ),
        MLFLOW: _spawn(mlflow_command(mlflow_port, data_dir), logs / "mlflow.log", mlflow_url, mlflow_url),
    }
    # Record before waiting, so `gptflow down` can stop what started even if `up` is interrupted.
    write_records(records)
    try:
        _wait_healthy(records[PREFECT], f"{prefect_url}/api/health", timeout)
        _wait_healthy(records[MLFLOW], f"{mlflow_url}/health", timeout)
    except BaseException:
        down()
        raise
    return records


def down(timeout: float = 30.0) -> list[str]:
    """Stop every recorded server: SIGTERM to its process group, SIGKILL after `timeout`."""
    records = read_records()
    stopped = []
    for kind, record in records.items():
        if is_alive(record.pid):
            _stop_group(record.pid, timeout)
            stopped.append(kind)
    write_records({})
    return stopped


def _spawn(
    command: list[str], log_file: Path, api_url: str, ui_url: str, env: dict[str, str] | None = None
) -> ServerRecord:
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    return ServerRecord(pid=process.pid, api_url=api_url, ui_url=ui_url, log_file=str(log_file))


def _require_free_port(port: int) -> None:
    with socket.socket() as s:
        # Connections of a server stopped a moment ago linger in TIME_WAIT; only a listener counts.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            raise UserError(
                f"port {port} on {HOST} is already in use; choose another with --prefect-port/--mlflow-port"
            ) from None


def check_prefect_server(attempts: int = 5, delay: float = 2.0) -> None:
    """Before a flow starts on the Prefect server `gptflow up` recorded, make sure it answers.

    While recorded (until `gptflow down`), that server is where flows go, alive or not, so that
    no run lands in a temporary server whose runs the UI never shows. It is asked for its health
    `attempts` times, the waits doubling from `delay` seconds (time for a restart), then the run
    stops with one line naming it. A PREFECT_API_URL the environment gave wins: it is not checked.
    With no server named at all, Prefect's temporary one is bound to this process (the command
    line imports Prefect only for a command that runs flows, which all call this first).
    """
    from ops.embedded_server import bind_embedded_server  # imports Prefect: slow

    bind_embedded_server()
    record = recorded_server(PREFECT)
    if record is None or os.environ.get("PREFECT_API_URL") != record.api_url:
        return
    for attempt in range(attempts):
        if attempt:
            time.sleep(delay * 2 ** (attempt - 1))
        if _healthy(f"{record.api_url}/health"):
            return
    raise UserError(
        f"the Prefect server that `gptflow up` started, {record.api_url}, is unreachable after {attempts} "
        "attempts; start it again with `gptflow up` (or forget it with `gptflow down`), or set PREFECT_API_URL"
    )


def _wait_healthy(record: ServerRecord, health_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(record.pid):
            raise UserError(f"the server for {record.ui_url} exited during startup; see {record.log_file}")
        if _healthy(health_url):
            return
        time.sleep(1.0)
    raise UserError(f"{health_url} not healthy after {timeout:.0f} s; see {record.log_file}")


def _healthy(health_url: str) -> bool:
    try:
        with urllib.request.urlopen(health_url, timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _stop_group(pid: int, timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.2)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a server started by this very process must be reaped)."""
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return False
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it
    return is_alive(pid)
