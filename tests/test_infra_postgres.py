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
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from compose import INFRA, load_compose, load_env_file, service_environment
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


@contextmanager
def server(command: list[str], env: Mapping[str, str], health_url: str, log: Path) -> Iterator[None]:
    """Run `command` in its own process group until healthy; stop the group at the end."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **env},
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not _answers(health_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not become healthy at {health_url}:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left after 20 s."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    services = load_compose()["services"]
    variables = user_env_file()
    logs = Path(tempfile.mkdtemp(prefix="gptflow-infra-"))
    ports = {name: free_port() for name in ("postgres", "s3", "prefect", "mlflow")}
    addresses = {
        "postgres:5432": f"127.0.0.1:{ports['postgres']}",
        "minio:9000": f"127.0.0.1:{ports['s3']}",
        "prefect-server:4200": f"127.0.0.1:{ports['prefect']}",
        "mlflow:5000": f"127.0.0.1:{ports['mlflow']}",
    }

    def environment(name: str) -> dict[str, str]:
        return on_loopback(service_environment(services[name], variables), addresses)

    with ExitStack() as stack:
        postgres = stack.enter_context(running_postgres(ports["postgres"], variables["POSTGRES_PASSWORD"]))
        subprocess.run(
            ["sh", str(INFRA / "postgres" / "init-databases.sh")],
            env={**os.environ, **environment("postgres"), **postgres.client_env()}, check=True, capture_output=True,
        )  # fmt: skip

        s3_endpoint = f"http://{addresses['minio:9000']}"
        moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])]
        stack.enter_context(server(moto, {}, f"{s3_endpoint}/moto-api/", logs / "s3.log"))
        s3 = s3_client(s3_endpoint, variables)
        for bucket in ("ARTIFACT_BUCKET", "WORKSPACE_BUCKET"):  # what the create-buckets service does
            s3.create_bucket(Bucket=variables[bucket])

        prefect_env = {
            **environment("prefect-server"),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(ports["prefect"]),
            "PREFECT_HOME": str(logs / "prefect-home"),
        }
        prefect_url = f"http://{addresses['prefect-server:4200']}"
        prefect_command = [*services["prefect-server"]["entrypoint"], *services["prefect-server"]["command"]]
        stack.enter_context(server(prefect_command, prefect_env, f"{prefect_url}/api/health", logs / "prefect.log"))

        mlflow_env = {**environment("mlflow"), "MLFLOW_AUTH_CONFIG_PATH": str(logs / "basic-auth.ini")}
        mlflow_url = f"http://{addresses['mlflow:5000']}"
        mlflow_command = [str(INFRA / "mlflow" / "serve.sh"), *with_address(services["mlflow"]["command"], ports["mlflow"])]
        stack.enter_context(server(mlflow_command, mlflow_env, f"{mlflow_url}/health", logs / "mlflow.log"))

        yield Stack(postgres, s3_endpoint, f"{prefect_url}/api", mlflow_url, environment("worker"), variables)


def with_address(command: list[str], port: int) -> list[str]:
    """The compose command with `--host` set to loopback and `--port` to `port`."""
    command = list(command)
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
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
    """Run `code` in a fresh Python with the worker's environment; return its last output line."""
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


def test_mlflow_refuses_anonymous_clients_and_logs_runs_to_postgres_and_artifacts_to_s3(stack):
    search = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search"
    assert request(search, body={"max_results": 1})[0] == 401

    run_id = run_client(
        "import mlflow\n"
        "mlflow.set_experiment('infra-check')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_param('stage', 'pretrain')\n"
        "    mlflow.log_metric('val_loss', 2.5, step=7)\n"
        "    mlflow.log_text('hello from the worker', 'notes/hello.txt')\n"
        "print(run.info.run_id)\n",
        stack.client_env,
    )

    env = stack.client_env
    status, body = request(f"{stack.mlflow_url}/api/2.0/mlflow/runs/get?run_id={run_id}", auth=f"{env['MLFLOW_TRACKING_USERNAME']}:{env['MLFLOW_TRACKING_PASSWORD']}")
    assert status == 200
    assert body["info"]["status"] == "FINISHED"
    assert body["data"]["metrics"] == [{"key": "val_loss", "value": 2.5, "timestamp": body["data"]["metrics"][0]["timestamp"], "step": 7}]
    assert body["data"]["params"] == [{"key": "stage", "value": "pretrain"}]
    assert psql(stack.postgres, "mlflow", f"SELECT value FROM metrics WHERE run_uuid = '{run_id}'") == "2.5"

    bucket = stack.variables["ARTIFACT_BUCKET"]
    objects = s3_client(stack.s3_endpoint, stack.variables).list_objects_v2(Bucket=bucket).get("Contents", [])
    stored = [o["Key"] for o in objects if o["Key"].endswith(f"{run_id}/artifacts/notes/hello.txt")]
    assert len(stored) == 1
    body = s3_client(stack.s3_endpoint, stack.variables).get_object(Bucket=bucket, Key=stored[0])["Body"].read()
    assert body == b"hello from the worker"


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
