"""The whole pipeline on a micro config: Prefect (the session's test server) and MLflow (the
session's temporary SQLite store), then the registry's champion gate across runs."""

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect import flow, get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    ArtifactFilterType,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.states import Cancelling
from typer.testing import CliRunner

from cli.app import app
from flows import prepare
from flows.pipeline import pipeline
from flows.pipeline_config import load_config
from flows.plan import plan
from flows.run.gate_events import PROMOTED, REJECTED, RESOURCE_PREFIX
from model.checkpoint import latest_checkpoint
from model.errors import UserError
from support.configs import write_pipeline_config
from support.models import greedy_completions
from tasks import tracking
from tasks.ingest import IngestConfig, IngestOutput
from tasks.register import CANDIDATE, CHAMPION
from tasks.tracking.stage_run import artifact_key

DATA_STAGES = ("ingest", "bpe", "shard")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return write_pipeline_config(tmp_path_factory.mktemp("pipeline"), name=f"micro-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def first_run(prefect_server, micro):
    """The micro pipeline's first run: everything built, version 1 registered."""
    return pipeline(load_config(micro))


def stage_runs(parent_run_id):
    """The nested runs under a pipeline run, by name."""
    mlflow_client = MlflowClient(tracking.resolve_tracking_uri())
    parent = mlflow_client.get_run(parent_run_id)
    runs = mlflow_client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["start_time ASC"],
    )
    by_name = {}
    for run in runs:
        by_name.setdefault(run.info.run_name, []).append(run)
    return by_name


def committed_fingerprint(workspace, stage):
    (manifest,) = (workspace / stage).glob("*/manifest.json")
    return json.loads(manifest.read_text())["fingerprint"]


def test_pipeline_end_to_end_then_rerun_skips(first_run, micro):
    config, result = load_config(micro), first_run

    # Registry: one version, candidate and champion, with its lineage.
    registered = result.registered
    assert (registered.version, registered.champion_version) == ("1", "1")
    for alias in (CANDIDATE, CHAMPION):
        assert str(tracking.version_for_alias(config.name, alias).version) == "1"
    tags = tracking.version_for_alias(config.name, CANDIDATE).tags
    assert tags["data_fingerprint"] == committed_fingerprint(config.workspace, "ingest")
    assert tags["tokenizer_fingerprint"] == committed_fingerprint(config.workspace, "bpe")
    expected_commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["git_commit"].startswith(expected_commit)

    # MLflow: a parent run tagged with the flow run, a nested run per stage with its figures.
    parent = tracking.get_run(result.mlflow_run_id)
    assert parent.data.tags["prefect.flow_run_id"]
    assert {d.dataset.name: d.dataset.digest for d in parent.inputs.dataset_inputs} == {
        "corpus": committed_fingerprint(config.workspace, "ingest"),
        "shards": committed_fingerprint(config.workspace, "shard"),
    }
    runs = stage_runs(result.mlflow_run_id)
    assert set(runs) == {*DATA_STAGES, "pretrain", "evaluate-pretrained", "finetune", "evaluate-finetuned", "register"}
    assert all(run.info.status == "FINISHED" for group in runs.values() for run in group)
    (pretrain_run,) = runs["pretrain"]
    losses = MlflowClient(tracking.resolve_tracking_uri()).get_metric_history(pretrain_run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, config.pretrain.max_steps + 1))
    # The parent run carries pretraining's loss curve (for comparing pipeline runs); the stage its figure.
    mlflow_client = MlflowClient(tracking.resolve_tracking_uri())
    parent_losses = mlflow_client.get_metric_history(result.mlflow_run_id, "pretrain_loss")
    assert sorted((m.step, m.value) for m in parent_losses) == sorted((m.step, m.value) for m in losses)
    stage_files = {a.path for a in mlflow_client.list_artifacts(pretrain_run.info.run_id)}
    assert "loss_curve.png" in stage_files
    # Each checkpoint pretraining kept is an external logged model: its step and path, no upload.
    logged = mlflow_client.search_logged_models([parent.info.experiment_id])
    checkpoints = {
        m.params["path"]: m.params["step"]
        for m in logged
        if m.model_type == "checkpoint" and m.source_run_id == pretrain_run.info.run_id
    }
    kept = sorted(Path(config.workspace).glob("pretrain/*/checkpoints/step-*"))
    assert checkpoints == {str(path): path.name.removeprefix("step-") for path in kept} and kept
    assert pretrain_run.data.params["pretrain.max_steps"] == str(config.pretrain.max_steps)
    finetuned_eval = runs["evaluate-finetuned"][0].data.metrics
    assert finetuned_eval["val_bits_per_byte"] == pytest.approx(result.metrics["val_bits_per_byte"])
    assert parent.data.metrics["finetuned_val_bits_per_byte"] == pytest.approx(result.metrics["val_bits_per_byte"])
    assert runs["register"][0].data.metrics["gate_candidate"] == pytest.approx(result.metrics["val_bits_per_byte"])
    assert runs["ingest"][0].data.tags["reused"] == "False"
    artifacts = {a.path for a in MlflowClient(tracking.resolve_tracking_uri()).list_artifacts(result.mlflow_run_id)}
    assert {"config.yaml", "pretrain_loss_curve.png", "finetune_loss_curve.png"} <= artifacts

    # Prefect: the flow run's summary artifact, and its prepare-data subflow run's, link the MLflow run.
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(config.name, "pipeline")]))
        )
        data_artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(config.name, "data")]))
        )
        [data_artifact] = [artifact for artifact in data_artifacts if result.mlflow_run_id in artifact.data]
        data_flow_run = client.read_flow_run(data_artifact.flow_run_id)
    assert artifacts and result.mlflow_run_id in artifacts[0].data
    assert "val_bits_per_byte" in artifacts[0].data
    assert data_flow_run.name == f"prepare-data-{config.name}"
    assert committed_fingerprint(config.workspace, "shard") in data_artifact.data
    # Each training and evaluation task run of this flow run reported its progress, to the end.
    with get_client(sync_client=True) as client:
        progress = client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))
    progress = {a.key: a for a in progress if str(a.flow_run_id) == parent.data.tags["prefect.flow_run_id"]}
    assert {
        "pretrain-progress",
        "evaluate-pretrained-val-windows",
        "evaluate-pretrained-held-out-documents",
        "evaluate-pretrained-samples",
        "finetune-progress",
        "evaluate-finetuned-val-windows",
    } <= set(progress)  # and fine-tuning's scoring phases (tasks/core/train_progress.py: phase_progress)
    assert any(key.startswith("finetune-completion-loss-") for key in progress)
    assert all(artifact.data == 100.0 and artifact.task_run_id for artifact in progress.values())

    # The registered pyfunc loads in a fresh process and writes what greedy generation from
    # the final checkpoint writes; sampled, it writes strings too.
    prompts = ["def plus", ""]
    script = (
        "import json, sys, mlflow\n"
        f"model = mlflow.pyfunc.load_model('models:/{config.name}@champion')\n"
        "prompts = json.loads(sys.argv[1])\n"
        "greedy = model.predict(prompts, params={'max_new_tokens': 6, 'temperature': 0.0})\n"
        "print(json.dumps([greedy, model.predict(prompts, params={'max_new_tokens': 6, 'seed': 1})]))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, json.dumps(prompts)], capture_output=True, text=True, env=os.environ, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    greedy, sampled = json.loads(completed.stdout.strip().splitlines()[-1])
    (tokenizer,) = (config.workspace / "bpe").glob("*/tokenizer.json")
    assert greedy == greedy_completions(result.final_checkpoint, tokenizer, prompts, 6)
    assert any(greedy)  # not just an <|endoftext|> each, which would match any model
    assert len(sampled) == 2 and all(isinstance(text, str) for text in sampled)

    generated = CliRunner().invoke(
        app, ["generate", f"models:/{config.name}/1", "-p", "def plus", "-p", "class", "--max-new-tokens", "4"]
    )
    assert generated.exit_code == 0, generated.output
    assert generated.output.startswith("def plus") and "\nclass" in generated.output

    # A rerun plans nothing but the registry, skips the data stages, registers nothing new.
    dry_run = CliRunner().invoke(app, ["run", str(micro), "--dry-run"])
    assert dry_run.exit_code == 0, dry_run.output
    planned = dict(line.split()[:2] for line in dry_run.output.split("# stages")[1].splitlines()[1:] if line.strip())
    assert planned == {
        "ingest": "skip",
        "train-tokenizer": "skip",
        "shard": "skip",
        "pretrain": "skip",
        "evaluate-pretrained": "skip",
        "finetune": "skip",
        "evaluate-finetuned": "skip",
        "register-model": "run",
    }
    again = pipeline(config)
    assert again.registered.version == "1" and "nothing new registered" in again.registered.decision
    rerun = stage_runs(again.mlflow_run_id)
    assert all(rerun[stage][0].data.tags["reused"] == "True" for stage in DATA_STAGES)


def test_champion_moves_only_to_a_better_version(first_run, micro):
    name = load_config(micro).name  # version 1, the first run's fine-tuned model, is champion

    def run(*overrides):
        return pipeline(load_config(micro, ["finetune=null", *overrides])).registered

    better = run("pretrain.max_steps=40")
    worse = run("pretrain.max_steps=2", "pretrain.lr=1.0e-5")

    assert better.promoted and better.candidate_value < better.champion_value
    assert better.champion_value == pytest.approx(first_run.registered.candidate_value)
    assert not worse.promoted and worse.candidate_value > worse.champion_value
    assert str(tracking.version_for_alias(name, CHAMPION).version) == better.version == "2"
    assert str(tracking.version_for_alias(name, CANDIDATE).version) == worse.version == "3"

    # What an automation sees, read back through the Prefect API: one event per judged version.
    events = wait_until(lambda: gate_events(name) if len(gate_events(name)) == 3 else None, 60, "three gate events")
    decisions = [(event.event, event.payload["version"]) for event in events]
    assert decisions == [(PROMOTED, "1"), (PROMOTED, "2"), (REJECTED, "3")]
    promoted, rejected = events[1].payload, events[2].payload
    assert promoted["name"] == name and promoted["gate_metric"] == "val_bits_per_byte"
    assert promoted["candidate_value"] == better.candidate_value and promoted["champion_value"] == better.champion_value
    assert rejected["candidate_value"] == worse.candidate_value and rejected["champion_value"] == worse.champion_value
    assert rejected["champion_version"] == "2" and tracking.get_run(rejected["mlflow_run_id"]).data.tags
    assert events[2].resource.id == RESOURCE_PREFIX + name


@pytest.mark.parametrize(
    "overrides", [["finetune.start_from=FINETUNED"], ["finetune=null"]], ids=["start_from", "null"]
)
def test_the_plan_is_what_the_run_does(first_run, micro, overrides):
    """On a completed workspace, `gptflow run --dry-run`'s plan names each step's fingerprint
    and reuse as the run then writes them: fine-tuning from a checkpoint directory other than
    pretraining's output (the first run's fine-tuned one), and with no fine-tuning at all."""
    config = load_config(micro, [o.replace("FINETUNED", str(first_run.final_checkpoint)) for o in overrides])
    planned = {step.label: step for step in plan(config)}
    ran = pipeline(config).stages

    assert list(planned) == [*ran, "register-model"]
    for label, record in ran.items():
        if planned[label].fingerprint is not None:
            assert (planned[label].stage, planned[label].fingerprint) == (record.stage, record.fingerprint), label
            assert (planned[label].action == "skip") == record.reused, label
    if config.finetune is not None:  # fine-tuning from other weights is new work, and planned as such
        assert planned["finetune"].action == "run" and planned["finetune"].fingerprint is not None
    # Once run, the plan names every step's output, each to be reused.
    replanned = {step.label: (step.stage, step.fingerprint, step.action) for step in plan(config)}
    assert replanned == {
        **{label: (record.stage, record.fingerprint, "skip") for label, record in ran.items()},
        "register-model": ("registry", None, "run"),
    }


def gate_events(name):
    """The gate events of registered model `name`, oldest first."""
    with get_client(sync_client=True) as client:
        page = client.read_events(
            EventFilter(
                event=EventNameFilter(prefix=["gptflow.model."]),
                resource=EventResourceFilter(id=[RESOURCE_PREFIX + name]),
            ),
            limit=50,
        )  # the client's default, 100, is more than the server accepts
    return sorted(page.events, key=lambda event: event.occurred)


@flow
def ingest_flow(config: IngestConfig, workspace: Path) -> IngestOutput:
    """The ingest task as the prepare-data flow runs it."""
    return prepare.ingest_for(config)(config, workspace)


def test_only_a_lost_connection_to_a_remote_source_is_retried(prefect_server, tmp_path, monkeypatch):
    import datasets

    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"document {i}: " + "words " * 20}) + "\n" for i in range(20))
    )
    real_load, attempts = datasets.load_dataset, []

    def unreachable_at_first(path, *args, **kwargs):
        attempts.append(path)
        if len(attempts) == 1:
            raise ConnectionError("Connection reset by peer")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", unreachable_at_first)
    monkeypatch.setattr(prepare, "REMOTE_RETRY_DELAYS", [0, 0])
    remote = IngestConfig(source=f"hf:{data}", streaming=True, min_chars=16, val_fraction=0.3)
    corpus = ingest_flow(remote, tmp_path / "workspace")
    assert len(attempts) == 2 and corpus.report["documents_out"] == 20

    # A config problem fails the same way every time: no retry.
    wrong_field = remote.model_copy(update={"text_field": "body"})
    with pytest.raises(UserError, match="ingest.text_field: 'body' is not a column"):
        ingest_flow(wrong_field, tmp_path / "workspace")
    assert len(attempts) == 3
    assert prepare.ingest_for(IngestConfig(source=str(data))).retries == 0  # local files: never retried


def test_cancelling_the_flow_run_stops_training_and_keeps_its_checkpoint(cli_env, micro, tmp_path):
    overrides = ["pretrain.max_steps=100000", "pretrain.checkpoint_every=5", "finetune=null"]
    config = load_config(micro, overrides)
    (pretrain,) = [step for step in plan(config) if step.stage == "pretrain"]
    checkpoints = config.workspace / "pretrain" / pretrain.fingerprint / "checkpoints"
    command = [str(Path(sys.executable).parent / "gptflow"), "run", str(micro), *(f"--set={o}" for o in overrides)]
    with open(tmp_path / "run.log", "w") as log:
        running = subprocess.Popen(command, env=cli_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: latest_checkpoint(checkpoints), 300, "a first pretraining checkpoint")
            with get_client(sync_client=True) as client:
                (flow_run,) = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
                    ),
                )
                client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
            running.wait(timeout=180)
        finally:
            running.kill()
    assert running.returncode != 0
    kept = latest_checkpoint(checkpoints)
    assert kept is not None and not (checkpoints.parent / "manifest.json").exists()
    assert int(kept.name.removeprefix("step-")) < config.pretrain.max_steps
    (pretrain,) = [step for step in plan(config) if step.stage == "pretrain"]
    assert pretrain.action == "resume"


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(1)
    return result


def test_status_and_clean(prefect_server, micro, tmp_path):
    config = load_config(micro)
    # An interrupted stage: a directory without a manifest.
    half_built = config.workspace / "pretrain" / "0123456789abcdef"
    half_built.mkdir(parents=True)
    (half_built / "partial.bin").write_bytes(b"x" * 10)

    status = CliRunner().invoke(app, ["status", str(config.workspace)])
    assert status.exit_code == 0
    lines = [line.split() for line in status.output.splitlines()]
    assert ["pretrain", "0123456789abcdef", "10", "B", "incomplete"] in lines
    assert sum(line[-1] == "complete" for line in lines) >= 6

    dry = CliRunner().invoke(app, ["clean", str(config.workspace), "--dry-run"])
    assert f"would remove {half_built} (incomplete" in dry.output and half_built.exists()
    kept = CliRunner().invoke(app, ["clean", str(config.workspace), "--keep", str(micro)])
    assert kept.exit_code == 0, kept.output
    assert not half_built.exists()
    # What the config refers to stays: its plan still skips every stage.
    assert (
        "run"
        not in CliRunner()
        .invoke(app, ["run", str(micro), "--dry-run"])
        .output.split("# stages")[1]
        .split("register-model")[0]
    )
