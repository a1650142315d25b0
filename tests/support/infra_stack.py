"""infra/'s servers, run without Docker: PostgreSQL on 127.0.0.1 set up by
infra/postgres/init-databases.sh, an S3 API (moto) in MinIO's place, and the Prefect and
MLflow servers started with the command and environment docker-compose.yml gives them,
with auth on. Clients use the environment the compose file gives the worker.

Only the addresses differ from compose: service names become 127.0.0.1 and free ports, and
the Prefect server's PREFECT_HOME (its lease folder a volume in compose) is a directory of the
test's that outlives a restart. A server gets none of this test session's own Prefect
settings: what compose does not set, it does not have.
The session fixture `infra_stack` (conftest.py) starts it once for every test that needs it.
"""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import boto3

from support.compose import INFRA, load_compose, load_env_file, service_environment
from support.ports import free_port
from support.postgres import PostgresServer, running_postgres

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
    restart_prefect: Callable[[], None]  # stop the Prefect server and start it again, until healthy


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
        while not answers(health_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.process.args[0]} did not become healthy at {health_url}:\n{self.log.read_text()[-3000:]}"
                )
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
    """Start a server in its own process group with its output in `log`; add it to `started`.
    Its environment is `env` over this process's, less this session's Prefect settings."""
    session = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            env={**session, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started.append(Server(process, log))
    return started[-1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    """PostgreSQL, the S3 API, and the Prefect and MLflow servers with auth on, until exit."""
    services = load_compose()["services"]
    variables = user_env_file()
    ports = {name: free_port() for name in ("postgres", "s3", "prefect", "mlflow")}
    addresses = {
        "postgres:5432": f"127.0.0.1:{ports['postgres']}",
        "minio:9000": f"127.0.0.1:{ports['s3']}",
        "prefect-server:4200": f"127.0.0.1:{ports['prefect']}",
        "mlflow:5000": f"127.0.0.1:{ports['mlflow']}",
    }
    s3_url, prefect_url, mlflow_url = (
        f"http://{addresses[a]}" for a in ("minio:9000", "prefect-server:4200", "mlflow:5000")
    )

    def environment(name: str) -> dict[str, str]:
        return on_loopback(service_environment(services[name], variables), addresses)

    with ExitStack() as stack:
        postgres = stack.enter_context(running_postgres(ports["postgres"], variables["POSTGRES_PASSWORD"]))
        subprocess.run(
            ["sh", str(INFRA / "postgres" / "init-databases.sh")],
            env={**os.environ, **environment("postgres"), **postgres.client_env()},
            check=True,
            capture_output=True,
        )

        started = stack.enter_context(process_groups())
        s3_server = start(
            started,
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(ports["s3"])],
            {},
            workdir / "s3.log",
        )
        prefect_command = [*services["prefect-server"]["entrypoint"], *services["prefect-server"]["command"]]
        prefect_env = {
            **environment("prefect-server"),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(ports["prefect"]),
            "PREFECT_HOME": str(workdir / "prefect-home"),
        }
        prefect = start(started, prefect_command, prefect_env, workdir / "prefect.log")
        restarts = itertools.count(1)

        def restart_prefect() -> None:
            """SIGTERM to the Prefect server's process group (what `docker compose restart`
            sends), then the same command and environment again, until healthy."""
            (server,) = [s for s in started if s.process.args == prefect_command]
            os.killpg(server.process.pid, signal.SIGTERM)
            server.process.wait(timeout=60)
            started.remove(server)
            log = workdir / f"prefect-restart-{next(restarts)}.log"
            start(started, prefect_command, prefect_env, log).wait_healthy(f"{prefect_url}/api/health")

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
        yield Stack(
            postgres, s3_url, f"{prefect_url}/api", mlflow_url, environment("worker"), variables, restart_prefect
        )


def on_this_machine(command: list[str], port: int) -> list[str]:
    """The compose command with `--host` set to loopback, `--port` to `port`, and one
    worker process (this machine has two cores, shared with the other servers)."""
    command = list(command)
    for option, value in (("--host", "127.0.0.1"), ("--port", str(port)), ("--workers", "1")):
        command[command.index(option) + 1] = value
    return command


def s3_client(endpoint: str, variables: Mapping[str, str]):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=variables["MINIO_ROOT_USER"],
        aws_secret_access_key=variables["MINIO_ROOT_PASSWORD"],
    )
