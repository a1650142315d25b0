"""Nothing from a file is unpickled, manifests cannot reach outside their stage, secrets in
the environment never reach MLflow, Prefect or the logs, and local servers bind loopback."""

from __future__ import annotations

import json
import secrets
import sqlite3
import uuid
from pathlib import Path

import pytest
import torch
from prefect import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from flows.pipeline_config import load_config
from model.checkpoint import STATE, WEIGHTS, load_model, load_state, save_checkpoint
from model.errors import UserError
from model.gpt import GPT
from model.train import train
from ops import servers
from support.compose import load_compose
from support.configs import MICRO_GPT, micro_train_config, write_pipeline_config
from support.corpus import RandomBatches
from tasks import tracking
from tasks.core.workspace import StageDir, sha256_file


class PlantedPayload:
    """Unpickling this runs `marker.touch()`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "run" / "checkpoints", 2, GPT(MICRO_GPT), state={"optimizer": {}}, keep=1)


def test_a_pickle_planted_in_the_training_state_is_refused_without_running(checkpoint, tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"step": 2, "optimizer": PlantedPayload(marker)}, checkpoint / STATE)
    assert not marker.exists()

    with pytest.raises(UserError, match=f"{checkpoint / STATE}: refused"):
        load_state(checkpoint)
    # The engine resuming from that directory refuses it the same way.
    with pytest.raises(UserError, match="refused"):
        train(GPT(MICRO_GPT), micro_train_config(max_steps=4), RandomBatches(), None, checkpoint.parents[1])
    assert not marker.exists()


def test_a_pickle_in_place_of_the_weights_is_not_unpickled(checkpoint, tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"weights": PlantedPayload(marker)}, checkpoint / WEIGHTS)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize(
    "path", ["../../bpe/tokenizer.json", "../sibling/train-00000.parquet", "/etc/passwd", "a/../../x"]
)
def test_manifest_paths_cannot_leave_the_stage_directory(tmp_path, path):
    stage = StageDir(tmp_path, "shard", "0123456789abcdef")
    stage.path.mkdir(parents=True)
    outside = tmp_path / "bpe" / "tokenizer.json"  # a real file the path could reach
    outside.parent.mkdir()
    outside.write_text("{}")
    stage.commit({"files": [{"path": path, "sha256": sha256_file(outside)}]})
    with pytest.raises(UserError, match="leaves the stage directory"):
        stage.read_manifest(verify=True)


# --- secrets ------------------------------------------------------------------------------

SECRET_NAMES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
)


def files_containing(root: Path, needles: dict[str, str]) -> list[str]:
    """`NAME in path` for every file under `root` whose bytes contain a needle's value."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{name} in {path}" for name, value in needles.items() if value.encode() in data]
    return found


@pytest.mark.slow
def test_secrets_in_the_environment_never_reach_tracking_artifacts_or_logs(
    prefect_server, tmp_path, monkeypatch, capfd
):
    # Each value is unique, so finding it anywhere can only mean it leaked from the environment.
    planted = {name: f"leak-{name.lower()}-{secrets.token_hex(8)}" for name in SECRET_NAMES}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    store = tmp_path / "tracking"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    name = f"secrets-{uuid.uuid4().hex[:6]}"
    config = write_pipeline_config(tmp_path, name=name)

    from flows.pipeline import pipeline

    state = pipeline(load_config(config, ["finetune=null", "pretrain.max_steps=4"]), return_state=True)
    result = state.result()
    output = "".join(capfd.readouterr())

    # MLflow: the database (params, tags, metrics, run names, registry) and every artifact.
    leaks = files_containing(store, planted)
    with sqlite3.connect(store / "mlflow.db") as db:
        params = db.execute("SELECT key, value FROM params").fetchall()
        tags = db.execute("SELECT key, value FROM tags").fetchall()
    assert params and tags  # the run did log, so finding nothing means something
    assert files_containing(store, {"the config's name": name})  # and the search does see what was logged
    # The workspace (manifests, reports, specs, checkpoints) and the console.
    leaks += files_containing(tmp_path / "workspace", planted)
    leaks += [f"{name} in the console output" for name, value in planted.items() if value in output]
    # Prefect: the flow run's parameters and every log line it sent to the API.
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    assert logs
    prefect_text = json.dumps(flow_run.parameters, default=str) + "\n".join(log.message for log in logs)
    leaks += [f"{name} in Prefect" for name, value in planted.items() if value in prefect_text]
    assert tracking.get_run(result.mlflow_run_id).info.status == "FINISHED"
    assert not leaks, leaks


# --- servers --------------------------------------------------------------------------------


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_servers_started_by_gptflow_listen_on_loopback_only(tmp_path):
    for command in (servers.prefect_command(4200), servers.mlflow_command(5000, tmp_path)):
        assert option(command, "--host") == "127.0.0.1", command
        assert "0.0.0.0" not in " ".join(command)


def test_infra_credentials_come_only_from_the_environment():
    """Every password, secret key and auth string in docker-compose.yml is a ${VARIABLE}."""
    sensitive = ("PASSWORD", "SECRET", "AUTH_STRING", "_KEY", "TOKEN")
    checked = 0
    for service in load_compose()["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if any(word in key for word in sensitive) and not key.endswith("_PATH"):
                assert "${" in str(value), f"{key} has a literal value in docker-compose.yml"
                checked += 1
    assert checked >= 5
