"""infra/'s servers, run without Docker: PostgreSQL on 127.0.0.1 set up by
infra/postgres/init-databases.sh, an S3 API (moto) in MinIO's place, and the Prefect and
MLflow servers started with the command and environment docker-compose.yml gives them,
with auth on. Clients use the environment the compose file gives the worker.

Only the addresses differ from compose: service names become 127.0.0.1 and free ports.
The stack itself is started once per session (tests/support/infra_stack.py, `infra_stack` in conftest.py).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from support import REPO
from support.configs import write_pipeline_config
from support.infra_stack import VENV_BIN, Stack, s3_client
from support.postgres import PostgresServer, postgres_bin_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        postgres_bin_dir() is None, reason="PostgreSQL is not installed; `make test` installs Debian's postgresql"
    ),
]


@pytest.fixture(scope="module")
def stack(infra_stack) -> Stack:
    return infra_stack


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
        env={**os.environ, **postgres.client_env()},
        check=True,
        capture_output=True,
        text=True,
    )
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
    assert psql(stack.postgres, "mlflow_auth", f"SELECT is_admin FROM users WHERE username = '{admin}'") == "t"
    owners = psql(
        stack.postgres, "postgres", "SELECT datname || '=' || pg_get_userbyid(datdba) FROM pg_database ORDER BY 1"
    )
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
    task_runs = request(
        f"{stack.prefect_api_url}/task_runs/filter", auth=auth, body={"flow_runs": {"id": {"any_": [flow_run_id]}}}
    )[1]
    assert sorted(t["state"]["type"] for t in task_runs) == ["COMPLETED"] * 4
    assert psql(stack.postgres, "prefect", f"SELECT state_type FROM flow_run WHERE id = '{flow_run_id}'") == "COMPLETED"


# A flow run that holds the `gpu` slot the way training does (flows.run.context.holding_gpus: a
# lease renewed while held) until the file named by its argument exists.
HOLD_THE_GPU_SLOT = """
import sys, time
from pathlib import Path
from prefect import flow
from prefect.runtime import flow_run
from flows.run.context import holding_gpus

@flow(name="hold-gpu")
def hold(release: str) -> str:
    with holding_gpus():
        print("holding", flush=True)
        while not Path(release).exists():
            time.sleep(0.2)
    return str(flow_run.id)

print(hold(sys.argv[1]), flush=True)
"""


@contextmanager
def holding_the_gpu_slot(stack: Stack, release: Path) -> Iterator[subprocess.Popen]:
    """A flow run of HOLD_THE_GPU_SLOT; killed if it is still running when the block ends."""
    run = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_GPU_SLOT, str(release)],
        cwd=REPO,
        env={**os.environ, **stack.client_env, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield run
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()


def gpu_slots_taken(stack: Stack) -> int:
    status, limit = request(
        f"{stack.prefect_api_url}/v2/concurrency_limits/gpu", auth=stack.client_env["PREFECT_API_AUTH_STRING"]
    )
    assert status == 200
    return limit["active_slots"]


def test_a_run_holding_the_gpu_slot_outlives_a_prefect_server_restart_and_frees_the_slot(stack, tmp_path):
    release = tmp_path / "release"
    with holding_the_gpu_slot(stack, release) as holder:
        lines = []
        while not lines or lines[-1] != "holding\n":  # each readline waits for the run's next line
            lines.append(holder.stdout.readline())
            assert lines[-1], "".join(lines)[-3000:]  # the run ended without holding the slot
        assert gpu_slots_taken(stack) == 1

        stack.restart_prefect()  # with compose's environment: leases in files under PREFECT_HOME
        assert gpu_slots_taken(stack) == 1
        release.touch()
        output, _ = holder.communicate(timeout=300)
        assert holder.returncode == 0, "".join(lines)[-2000:] + output[-3000:]
    assert gpu_slots_taken(stack) == 0  # released through the lease the restarted server still knew

    # A second run gets the slot at once (with the lease lost in a restart it would wait for ever).
    with holding_the_gpu_slot(stack, release) as second:
        output, _ = second.communicate(timeout=300)
        assert second.returncode == 0, output[-3000:]
    assert gpu_slots_taken(stack) == 0


def test_the_micro_pipeline_runs_end_to_end_against_the_stack(stack, tmp_path):
    name = f"infra-micro-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [str(VENV_BIN / "gptflow"), "run", str(write_pipeline_config(tmp_path, name=name))],
        env={**os.environ, **stack.client_env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # Prefect on PostgreSQL: the pipeline's flow run and its data subflow completed.
    flow_runs = psql(
        stack.postgres,
        "prefect",
        "SELECT f.name || '=' || r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id",
    )
    assert {"pipeline=COMPLETED", "prepare-data=COMPLETED"} <= set(flow_runs.split())
    # MLflow on PostgreSQL: version 1 of the model, the champion; its files in the S3 bucket.
    assert psql(stack.postgres, "mlflow", f"SELECT version FROM model_versions WHERE name = '{name}'") == "1"
    assert (
        psql(
            stack.postgres,
            "mlflow",
            f"SELECT version FROM registered_model_aliases WHERE name = '{name}' AND alias = 'champion'",
        )
        == "1"
    )
    s3 = s3_client(stack.s3_endpoint, stack.variables)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=stack.variables["ARTIFACT_BUCKET"])
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(key.endswith(".safetensors") for key in keys), keys
