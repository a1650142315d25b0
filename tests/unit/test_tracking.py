"""tasks/tracking against a real MLflow store (the session's temporary SQLite)."""

import os
import subprocess
import sys
import uuid

import pytest
from mlflow.tracking import MlflowClient

from model.errors import UserError
from ops import server_state
from ops.environment import hand_over_tracking_server
from support.ports import free_port
from tasks import tracking


@pytest.fixture
def experiment():
    return f"test-tracking-{uuid.uuid4().hex[:8]}"


def test_flatten_keeps_leaves_and_dots_the_path():
    nested = {"name": "x", "model": {"n_layer": 2, "attention": {"kind": "dense"}}, "prompts": ["a", "b"], "empty": {}}
    assert tracking.flatten(nested) == {
        "name": "x",
        "model.n_layer": 2,
        "model.attention.kind": "dense",
        "prompts": ["a", "b"],
        "empty": {},
    }


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    server_state.write_records(
        {
            server_state.MLFLOW: server_state.ServerRecord(
                pid=os.getpid(), api_url="http://127.0.0.1:5999", ui_url="x", log_file="x"
            )
        }
    )

    def resolved() -> str:
        """The URI tracking uses in a process that an entry point started with this environment."""
        hand_over_tracking_server()
        uri = tracking.resolve_tracking_uri()
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the next check starts afresh
        return uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert resolved() == "sqlite:///elsewhere.db"

    assert resolved() == "http://127.0.0.1:5999"

    # A server whose process has exited (restarting, crashed) is still the URI: a run waits for
    # it or names it, never tracks into the cwd's database instead.
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    server_state.write_records(
        {
            server_state.MLFLOW: server_state.ServerRecord(
                pid=finished.pid, api_url="http://127.0.0.1:5999", ui_url="x", log_file="x"
            )
        }
    )
    assert resolved() == "http://127.0.0.1:5999"

    # Forgotten by `gptflow down`: the embedded default in the cwd.
    server_state.write_records({})
    assert resolved() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_unreachable_server_is_named_after_bounded_retries():
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(UserError, match=f"{uri} is unreachable after 2 attempts"):
        tracking.check_tracking_server(uri, attempts=2, delay=0.01)


def test_reachable_store_passes_the_check():
    assert tracking.check_tracking_server(attempts=1) == tracking.resolve_tracking_uri()


def test_nested_runs_params_metrics_and_status(experiment):
    parent = tracking.start_run(experiment, "pipeline", tags={"prefect.flow_run_id": "abc"})
    with tracking.child_run(parent, "pretrain") as child:
        tracking.log_params(child, {"pretrain": {f"p{i}": i for i in range(250)}, "long": "x" * 7000})
        with tracking.MetricsLogger(child) as log:
            for step in range(5):
                log(step, {"loss": 10.0 - step, "lr": 0.1 * step})
        tracking.log_metrics(child, {"val_loss": 1.5})
    with pytest.raises(RuntimeError), tracking.child_run(parent, "evaluate") as failed:
        raise RuntimeError("stage broke")
    tracking.end_run(parent)

    mlflow_client = MlflowClient(tracking.resolve_tracking_uri())
    child_run = mlflow_client.get_run(child)
    assert child_run.data.tags["mlflow.parentRunId"] == parent
    assert child_run.info.experiment_id == mlflow_client.get_run(parent).info.experiment_id
    assert child_run.info.status == "FINISHED"
    assert mlflow_client.get_run(failed).info.status == "FAILED"
    assert mlflow_client.get_run(parent).data.tags["prefect.flow_run_id"] == "abc"
    experiment_tags = mlflow_client.get_experiment(child_run.info.experiment_id).tags
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view

    params = child_run.data.params
    assert len(params) == 251 and params["pretrain.p249"] == "249"
    assert len(params["long"]) == 6000 and params["long"].endswith("...")

    history = mlflow_client.get_metric_history(child, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(s, 10.0 - s) for s in range(5)]
    assert child_run.data.metrics["val_loss"] == 1.5


def test_end_run_refuses_unknown_status(experiment):
    run_id = tracking.start_run(experiment, "r")
    with pytest.raises(Exception, match="DONE"):
        tracking.end_run(run_id, "DONE")


def test_datasets_and_artifacts(experiment, tmp_path):
    run_id = tracking.start_run(experiment, "data")
    tracking.log_dataset(
        run_id, "corpus", "0123456789abcdef", tmp_path / "corpus", "pretrain", profile={"documents": 12}
    )
    (tmp_path / "report.json").write_text('{"ok": true}')
    tracking.log_artifact(run_id, tmp_path / "report.json", "reports")
    tracking.log_dict(run_id, {"name": "x"}, "config.yaml")

    run = tracking.get_run(run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("corpus", "0123456789abcdef")
    assert '"documents": 12' in dataset_input.dataset.profile
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "pretrain"
    artifacts = MlflowClient(tracking.resolve_tracking_uri()).list_artifacts(run_id, "reports")
    assert [a.path for a in artifacts] == ["reports/report.json"]
    assert tracking.run_link(run_id).startswith(f"runs:/{run_id}")


def test_system_metrics_sampled_on_a_run(experiment, monkeypatch):
    import time

    import psutil

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    run_id = tracking.start_run(experiment, "pretrain")
    mlflow_client = MlflowClient(tracking.resolve_tracking_uri())
    with tracking.runs.system_metrics(run_id):
        deadline = time.monotonic() + 60
        while len(mlflow_client.get_metric_history(run_id, "system/cpu_utilization_percentage")) < 2:
            assert time.monotonic() < deadline, "no system metrics after 60 s"
            sum(i * i for i in range(100_000))  # something for the CPU to do
    tracking.end_run(run_id)
    metrics = mlflow_client.get_run(run_id).data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert 0 < metrics["system/system_memory_usage_megabytes"] <= psutil.virtual_memory().total / 2**20


def test_loss_curves_refresh_during_training_and_reach_the_pipeline_run(experiment):
    import time

    from tasks.tracking.loss_curves import live_loss_curves
    from tasks.tracking.stage_run import StageRun

    parent = tracking.start_run(experiment, "pipeline")
    mlflow_client = MlflowClient(tracking.resolve_tracking_uri())
    with tracking.child_run(parent, "pretrain") as child:
        stage = StageRun(child, parent)
        with live_loss_curves(stage, "pretrain", {"loss": "pretrain_loss"}, refresh_seconds=0.2):
            tracking.log_steps(child, [("loss", 1, 5.0), ("lr", 1, 0.1), ("grad_norm", 1, 2.0)])
            deadline = time.monotonic() + 60
            while "loss_curve.png" not in {a.path for a in mlflow_client.list_artifacts(child)}:
                assert time.monotonic() < deadline, "no figure drawn while training"
                time.sleep(0.1)
            tracking.log_steps(child, [("loss", 2, 4.0), ("val_loss", 2, 4.5)])
    tracking.end_run(parent)
    assert sorted((m.step, m.value) for m in mlflow_client.get_metric_history(parent, "pretrain_loss")) == [
        (1, 5.0),
        (2, 4.0),
    ]  # each step once, though the first was copied by a refresh during training
    assert "pretrain_loss_curve.png" in {a.path for a in mlflow_client.list_artifacts(parent)}
    assert not mlflow_client.get_metric_history(parent, "val_loss")  # only the curves asked for


def test_checkpoints_become_external_logged_models_at_their_step(experiment, tmp_path):
    run_id = tracking.start_run(experiment, "pretrain")
    kept = [tmp_path / "checkpoints" / f"step-{step}" for step in (5, 10)]
    ids = tracking.log_checkpoints(run_id, "pretrain", kept)
    tracking.end_run(run_id)
    mlflow_client = MlflowClient(tracking.resolve_tracking_uri())
    models = [mlflow_client.get_logged_model(model_id) for model_id in ids]
    assert [(m.name, m.params, m.model_type, m.source_run_id) for m in models] == [
        ("pretrain-step-5", {"step": "5", "path": str(kept[0])}, "checkpoint", run_id),
        ("pretrain-step-10", {"step": "10", "path": str(kept[1])}, "checkpoint", run_id),
    ]
    for model_id in ids:  # nothing uploaded but the description MLflow writes of an external model
        assert [a.path for a in mlflow_client.list_logged_model_artifacts(model_id)] == ["MLmodel"]
