"""Servers started by `gptflow up` on free ports, and what tests and the soak (bench/soak.py) ask them
through their REST APIs: flow runs, deployments, MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil

from ops.server_state import MLFLOW, PREFECT, is_alive
from ops.servers import mlflow_command, prefect_command
from support.infra_stack import answers
from support.ports import free_port
from tasks.core.workspace import write_json_atomic

BIN = Path(sys.executable).parent


@dataclass
class Servers:
    root: Path
    config: Path
    env: dict[str, str]  # what a user's shell has: no server addresses, only the state file
    prefect: str  # UI address; the API is under /api
    mlflow: str
    name: str  # the config's name: its MLflow experiment and registered model

    def prefect_env(self) -> dict[str, str]:
        """For the `prefect` CLI, which knows nothing of gptflow's state file."""
        return {**self.env, "PREFECT_API_URL": f"{self.prefect}/api"}


def gptflow(servers: Servers, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [str(BIN / "gptflow"), *args],
        cwd=servers.root,
        env=env or servers.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, f"gptflow {' '.join(args)}:\n{completed.stdout}\n{completed.stderr}"
    return completed


@contextmanager
def started_servers(root: Path, name: str, write_config) -> Iterator[Servers]:
    """`gptflow up` on free ports with its state and Prefect's database under `root`, and the
    config `write_config(root, name)` writes; `gptflow down` on exit."""
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    # As in an activated venv: `mlflow models serve` starts `uvicorn` from PATH.
    env.update(
        GPTFLOW_HOME=str(root / "gptflow-home"),
        PREFECT_HOME=str(root / "prefect-home"),
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
    )
    prefect_port, mlflow_port = free_port(), free_port()
    servers = Servers(
        root,
        write_config(root, name),
        env,
        f"http://127.0.0.1:{prefect_port}",
        f"http://127.0.0.1:{mlflow_port}",
        name,
    )
    up = gptflow(servers, "up", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port), timeout=300)
    assert f"Prefect UI: {servers.prefect}" in up.stdout and f"MLflow UI:  {servers.mlflow}" in up.stdout
    try:
        yield servers
    finally:
        subprocess.run([str(BIN / "gptflow"), "down"], cwd=root, env=env, capture_output=True, timeout=120)


def post(url: str, body: dict) -> dict | list:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def patch(url: str, body: dict) -> None:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="PATCH"
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_for(condition, timeout: float, what: str, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def mlflow_runs(servers: Servers, filter_string: str = "", experiment: str | None = None) -> list[dict]:
    """The runs of `experiment` (the servers' config name by default) that match `filter_string`."""
    name = experiment or servers.name
    found = get(f"{servers.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name={name}")["experiment"]
    runs, token = [], None
    while True:  # a soak's runs fill more than one page
        page = post(
            f"{servers.mlflow}/api/2.0/mlflow/runs/search",
            {
                "experiment_ids": [found["experiment_id"]],
                "filter": filter_string,
                "max_results": 1000,
                **({"page_token": token} if token else {}),
            },
        )
        runs += page.get("runs", [])
        if not (token := page.get("next_page_token")):
            return runs


def tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def parent_run_of(servers: Servers, flow_run_id: str, experiment: str | None = None) -> dict:
    (run,) = mlflow_runs(servers, f"tags.`prefect.flow_run_id` = '{flow_run_id}'", experiment)
    return run


def flow_runs(servers: Servers, body: dict) -> list[dict]:
    return post(f"{servers.prefect}/api/flow_runs/filter", body)


def deployment(servers: Servers, name: str) -> dict | None:
    """The deployment `FLOW/NAME`, once it exists."""
    try:
        return get(f"{servers.prefect}/api/deployments/name/{name}")
    except urllib.error.HTTPError:
        return None


def flow_run_state(servers: Servers, flow_run_id: str) -> str:
    return get(f"{servers.prefect}/api/flow_runs/{flow_run_id}")["state_type"]


def stop(process: subprocess.Popen) -> None:
    """Stop a server this test started, with its process group."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


class RecordedServer:
    """A server process a test stops (SIGKILL, as in a crash, or SIGTERM, as a restart sends)
    and starts again with the same command, environment and log; its `health` address answers
    once it serves. With `kind` and `state_file`, a start records the new process in
    `gptflow up`'s state file under `kind`."""

    def __init__(self, command: list[str], uri: str, health: str, log: Path, env: dict[str, str] | None = None):
        self.command, self.uri, self.health, self.log, self.env = command, uri, health, log, env
        self.kind: str | None = None
        self.state_file: Path | None = None
        self.pid: int | None = None

    def taken_over(self, servers: Servers, kind: str) -> RecordedServer:
        """This server as the running one `gptflow up` recorded under `kind` for `servers`."""
        self.kind, self.state_file = kind, Path(servers.env["GPTFLOW_HOME"]) / "servers.json"
        record = json.loads(self.state_file.read_text())[kind]
        self.log, self.pid = Path(record["log_file"]), record["pid"]
        return self

    def start(self) -> None:
        with open(self.log, "ab") as log:
            process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        # Reaped as soon as it exits, whoever stops it: a zombie would still look alive to `gptflow down`.
        threading.Thread(target=process.wait, daemon=True).start()
        self.pid = process.pid
        if self.state_file:
            records = json.loads(self.state_file.read_text())
            write_json_atomic(self.state_file, {**records, self.kind: {**records[self.kind], "pid": self.pid}})
        deadline = time.monotonic() + 180
        while not answers(f"{self.uri}{self.health}"):
            assert is_alive(self.pid) and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL to the server and its workers: no shutdown, as in a crash."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM to the server and its workers (what `docker compose restart` sends): a clean shutdown."""
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        os.killpg(self.pid, signum)
        wait_for(lambda: not is_alive(self.pid), 60, f"the server (pid {self.pid}) to end", every=0.1)


class MlflowServer(RecordedServer):
    """`gptflow up`'s MLflow command on a port, over a SQLite store that outlives it: a server a
    test kills (as in a crash) and starts again. `of_gptflow_up` takes over the one `gptflow up`
    started, and a restart records the new process in `gptflow up`'s state file."""

    def __init__(self, data_dir: Path, port: int | None = None):
        port = port or free_port()
        super().__init__(mlflow_command(port, data_dir), f"http://127.0.0.1:{port}", "/health", data_dir / "server.log")

    @classmethod
    def of_gptflow_up(cls, servers: Servers) -> RecordedServer:
        """The MLflow server `gptflow up` started for `servers` (its data dir is the servers' root)."""
        return cls(servers.root, urlsplit(servers.mlflow).port).taken_over(servers, MLFLOW)


def prefect_server_of_gptflow_up(servers: Servers) -> RecordedServer:
    """The Prefect server `gptflow up` started for `servers`, to be stopped and started again on
    the same port, database (under PREFECT_HOME) and lease files, with the environment `gptflow up`
    gave it (read from the running process: the lease storage setting among it)."""
    command = prefect_command(urlsplit(servers.prefect).port)
    server = RecordedServer(command, servers.prefect, "/api/health", log=Path()).taken_over(servers, PREFECT)
    server.env = psutil.Process(server.pid).environ()
    return server
