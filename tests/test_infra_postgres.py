"""infra/'s servers, run without Docker: PostgreSQL on 127.0.0.1 set up by
infra/postgres/init-databases.sh, an S3 API (moto) in MinIO's place, and the Prefect and
MLflow servers started with the command and environment docker-compose.yml gives them,
with auth on. Clients use the environment the compose file gives the worker.

Only the addresses differ from compose: service names become 127.0.0.1 and free ports.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from compose import INFRA, load_compose, load_env_file, service_environment
from pipeline_micro import write_config
from postgres import PostgresServer, postgres_bin_dir, running_postgres

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(postgres_bin_dir() is None, reason="PostgreSQL is not installed; `make test` installs Debian's postgresql"),
]

VENV_BIN = Path(sys.executable).parent
STARTUP_TIMEOUT = 120.0


@dataclass(frozen=True)
class Stack:
    postgres: PostgresServer
    s3_endpoint: str
    prefect_api_url: str
    mlflow_url: str
    client_env: dict[str, str]  # the worker's environment: PREFECT_API_URL, MLFLOW_TRACKING_URI, auth
    variables: dict[str, str]  # the .env the stack was started with


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env_file() -> dict[str, str]:
    """infra/.env as a user writes it: the example, with a fresh secret in every empty entry."""
    return {name: value or secrets.token_hex(16) for name, value in load_env_file().items()}


def on_loopback(environment: Mapping[str, str], addresses: Mapping[str, str]) -> dict[str, str]:
    """The environment with each compose service address (`postgres:5432`) replaced by its
    local one (`127.0.0.1:<port>`)."""
    result = {}
    for key, value in environment.items():
        for service_address, local in addresses.items():
            value = value.replace(f"@{service_address}/", f"@{local}/").replace(f"//{service_address}", f"//{local}")
        result[key] = value
    return result


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen
    log: Path

    def wait_healthy(self, health_url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers(health_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.process.args[0]} did not become healthy at {health_url}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)


@contextmanager
def process_groups() -> Iterator[list[Server]]:
    """Servers started into the yielded list are stopped together at the end: SIGTERM to
    each one's process group (a server and its workers), SIGKILL to what is left after 20 s."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for server in started:
                with suppress(ProcessLookupError):
                    os.killpg(server.process.pid, sig)
            deadline = time.monotonic() + 20
            for server in started:
                with suppress(subprocess.TimeoutExpired):
                    server.process.wait(timeout=max(0.0, deadline - time.monotonic()))


def start(started: list[Server], command: list[str], env: Mapping[str, str], log: Path) -> Server:
    """Start a server in its own process group with its output in `log`; add it to `started`."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **env},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    started.append(Server(process, log))
    return started[-1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    services = load_compose()["services"]
    variables = user_env_file()
    workdir = tmp_path_factory.mktemp("infra")
    ports = {name: free_port() for name in ("postgres", "s3", "prefect", "mlflow")}
    addresses = {
        "postgres:5432": f"127.0.0.1:{ports['postgres']}",
        "minio:9000": f"127.0.0.1:{ports['s3']}",
        "prefect-server:4200": f"127.0.0.1:{ports['prefect']}",
        "mlflow:5000": f"127.0.0.1:{ports['mlflow']}",
    }
    s3_url, prefect_url, mlflow_url = (f"http://{addresses[a]}" for a in ("minio:9000", "prefect-server:4200", "mlflow:5000"))

    def environment(name: str) -> dict[str, str]:
        return on_loopback(service_environment(services[name], variables), addresses)

    with ExitStack() as stack:
        postgres = stack.enter_context(running_postgres(ports["postgres"], variables["POSTGRES_PASSWORD"]))
        subprocess.run(
            ["sh", str(INFRA / "postgres" / "init-databases.sh")],
            env={**os.environ, **environment("postgres"), **postgres.client_env()}, check=True, capture_output=True,
        )  # fmt: skip

        started = stack.enter_context(process_groups())
        s3_server = start(started, [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])], {}, workdir / "s3.log")
        prefect = start(
            started,
            [*services["prefect-server"]["entrypoint"], *services["prefect-server"]["command"]],
            {
                **environment("prefect-server"),
                "PREFECT_SERVER_API_HOST": "127.0.0.1",
                "PREFECT_SERVER_API_PORT": str(ports["prefect"]),
                "PREFECT_HOME": str(workdir / "prefect-home"),
            },
            workdir / "prefect.log",
        )
        mlflow = start(
            started,
            [str(INFRA / "mlflow" / "serve.sh"), *on_this_machine(services["mlflow"]["command"], ports["mlflow"])],
            # Compose writes the auth ini to the container's /tmp; here, to this test's directory.
            {**environment("mlflow"), "MLFLOW_AUTH_CONFIG_PATH": str(workdir / "basic-auth.ini")},
            workdir / "mlflow.log",
        )

        s3_server.wait_healthy(f"{s3_url}/moto-api/")
        s3 = s3_client(s3_url, variables)
        for bucket in ("ARTIFACT_BUCKET", "WORKSPACE_BUCKET"):  # what the create-buckets service does
            s3.create_bucket(Bucket=variables[bucket])
        prefect.wait_healthy(f"{prefect_url}/api/health")
        mlflow.wait_healthy(f"{mlflow_url}/health")
        yield Stack(postgres, s3_url, f"{prefect_url}/api", mlflow_url, environment("worker"), variables)


def on_this_machine(command: list[str], port: int) -> list[str]:
    """The compose command with `--host` set to loopback, `--port` to `port`, and one
    worker process (this machine has two cores, shared with the other servers)."""
    command = list(command)
    for option, value in (("--host", "127.0.0.1"), ("--port", str(port)), ("--workers", "1")):
        command[command.index(option) + 1] = value
    return command


def s3_client(endpoint: str, variables: Mapping[str, str]):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=variables["MINIO_ROOT_USER"], aws_secret_access_key=variables["MINIO_ROOT_PASSWORD"],
    )  # fmt: skip


def request(url: str, auth: str | None = None, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST when `body` is given; `auth` is user:password."""
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {}


def psql(postgres: PostgresServer, database: str, query: str) -> str:
    result = subprocess.run(
        ["psql", "--no-psqlrc", "--tuples-only", "--no-align", "--dbname", database, "--command", query],
        env={**os.environ, **postgres.client_env()}, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return result.stdout.strip()


def run_client(code: str, env: Mapping[str, str]) -> str:
    """Run `code` in a new Python with the worker's environment; return its last output line."""
    result = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_both_servers_keep_their_state_in_their_own_postgres_databases(stack):
    admin = stack.variables["MLFLOW_ADMIN_USERNAME"]
    assert psql(stack.postgres, "prefect", "SELECT to_regclass('flow_run') IS NOT NULL") == "t"
    assert psql(stack.postgres, "mlflow", "SELECT to_regclass('experiments') IS NOT NULL") == "t"
    assert psql(stack.postgres, "mlflow_auth", "SELECT is_admin FROM users WHERE username = " f"'{admin}'") == "t"
    owners = psql(stack.postgres, "postgres", "SELECT datname || '=' || pg_get_userbyid(datdba) FROM pg_database ORDER BY 1")
    assert {"mlflow=mlflow", "mlflow_auth=mlflow", "prefect=prefect"} <= set(owners.split())


def test_mlflow_refuses_anonymous_clients_and_logs_runs_to_postgres_and_artifacts_to_s3(stack, monkeypatch):
    search = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search"
    assert request(search, body={"max_results": 1})[0] == 401

    env = stack.client_env
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, env[name])
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run_id = client.create_run(client.create_experiment("infra-check")).info.run_id
    client.log_param(run_id, "stage", "pretrain")
    client.log_metric(run_id, "val_loss", 2.5, step=7)
    client.log_text(run_id, "hello from the worker", "notes/hello.txt")
    client.set_terminated(run_id)

    auth = f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}"
    status, body = request(f"{stack.mlflow_url}/api/2.0/mlflow/runs/get?run_id={run_id}", auth=auth)
    assert status == 200
    assert body["run"]["info"]["status"] == "FINISHED"
    assert [(m["key"], m["value"], m["step"]) for m in body["run"]["data"]["metrics"]] == [("val_loss", 2.5, 7)]
    assert body["run"]["data"]["params"] == [{"key": "stage", "value": "pretrain"}]
    assert psql(stack.postgres, "mlflow", f"SELECT value FROM metrics WHERE run_uuid = '{run_id}'") == "2.5"

    s3 = s3_client(stack.s3_endpoint, stack.variables)
    bucket = stack.variables["ARTIFACT_BUCKET"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    stored = [key for key in keys if key.endswith(f"{run_id}/artifacts/notes/hello.txt")]
    assert len(stored) == 1, keys
    assert s3.get_object(Bucket=bucket, Key=stored[0])["Body"].read() == b"hello from the worker"


def test_prefect_refuses_anonymous_clients_and_completes_a_flow_run(stack):
    assert request(f"{stack.prefect_api_url}/flow_runs/filter", body={})[0] == 401

    flow_run_id = run_client(
        "from prefect import flow, task\n"
        "from prefect.runtime import flow_run\n"
        "@task\n"
        "def square(x): return x * x\n"
        "@flow(name='infra-check')\n"
        "def check(): return sum(square.map(range(4)).result()), flow_run.id\n"
        "total, run_id = check()\n"
        "assert total == 14, total\n"
        "print(run_id)\n",
        stack.client_env,
    )

    auth = stack.client_env["PREFECT_API_AUTH_STRING"]
    status, body = request(f"{stack.prefect_api_url}/flow_runs/{flow_run_id}", auth=auth)
    assert status == 200
    assert body["state"]["type"] == "COMPLETED"
    task_runs = request(f"{stack.prefect_api_url}/task_runs/filter", auth=auth, body={"flow_runs": {"id": {"any_": [flow_run_id]}}})[1]
    assert sorted(t["state"]["type"] for t in task_runs) == ["COMPLETED"] * 4
    assert psql(stack.postgres, "prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == "COMPLETED"


def test_the_micro_pipeline_runs_end_to_end_against_the_stack(stack, tmp_path):
    name = f"infra-micro-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [str(VENV_BIN / "gptflow"), "run", str(write_config(tmp_path, name=name))],
        env={**os.environ, **stack.client_env}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Prefect on PostgreSQL: the pipeline's flow run and its data subflow completed.
    flow_runs = psql(stack.postgres, "prefect", "SELECT f.name || '=' || r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
    assert {"pipeline=COMPLETED", "prepare-data=COMPLETED"} <= set(flow_runs.split())
    # MLflow on PostgreSQL: version 1 of the model, the champion; its files in the S3 bucket.
    assert psql(stack.postgres, "mlflow", f"SELECT version FROM model_versions WHERE name = '{name}'") == "1"
    assert psql(stack.postgres, "mlflow", f"SELECT version FROM registered_model_aliases WHERE name = '{name}' AND alias = 'champion'") == "1"
    s3 = s3_client(stack.s3_endpoint, stack.variables)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.variables["ARTIFACT_BUCKET"])
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(key.endswith(".safetensors") for key in keys), keys
