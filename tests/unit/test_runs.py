"""`gptflow runs`: the pipeline runs of an experiment as a table, and two of them side by side."""

import re
import uuid

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from cli.app import app
from support.configs import write_pipeline_config
from tasks import tracking

LEARNING_RATES = ("0.01", "0.003", "0.001")


def pipeline_run(experiment: str, lr: str, val_loss: float, version: str | None) -> str:
    """A finished pipeline run as the pipeline leaves it: the config as params, headline
    figures, the version it registered, and a nested stage run."""
    run_id = tracking.start_run(experiment, f"{experiment}-lr{lr}")
    tracking.log_params(run_id, {"name": experiment, "pretrain": {"lr": lr, "max_steps": 20}, "model": {"n_layer": 1}})
    tracking.log_metrics(run_id, {"pretrain_val_loss": val_loss, "pretrained_val_bits_per_byte": val_loss / 2})
    if version:
        tracking.set_tags(run_id, {"registered_version": version})
    with tracking.child_run(run_id, "pretrain") as child:
        tracking.log_metrics(child, {"val_loss": val_loss})
    tracking.end_run(run_id)
    return run_id


def registered(experiment: str, run_ids: list[str]) -> None:
    """Versions 1 and 2 of the experiment's model; champion on 2, candidate on 2."""
    client = MlflowClient(tracking.resolve_tracking_uri())
    client.create_registered_model(experiment)
    for run_id in run_ids:
        client.create_model_version(experiment, f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias(experiment, "champion", "2")
    client.set_registered_model_alias(experiment, "candidate", "2")


def row_of(output: str, run_name: str) -> list[str]:
    [line] = [line for line in output.splitlines() if f" {run_name} " in line]
    return [cell.strip() for cell in re.split("[│┃]", line.strip().strip("│┃"))]


def test_runs_lists_differing_settings_figures_and_versions(tmp_path):
    experiment = f"runs-{uuid.uuid4().hex[:6]}"
    ids = [
        pipeline_run(experiment, lr, loss, version)
        for lr, loss, version in zip(LEARNING_RATES, (2.5, 2.25, 3.125), ("1", "2", None))
    ]
    registered(experiment, ids[:2])

    result = CliRunner().invoke(app, ["runs", str(write_pipeline_config(tmp_path, experiment))])
    assert result.exit_code == 0, result.output
    header = row_of(result.output, "run")
    assert header == [
        "run",
        "start",
        "status",
        "pretrain.lr",
        "pretrain_val_loss",
        "pretrained_val_bits_per_byte",
        "version",
    ]  # only the setting that differs; no nested stage run
    rows = [row_of(result.output, f"{experiment}-lr{lr}") for lr in LEARNING_RATES]
    assert [row[2:] for row in rows] == [
        ["FINISHED", "0.01", "2.5", "1.25", "1"],
        ["FINISHED", "0.003", "2.25", "1.125", "2 (candidate, champion)"],
        ["FINISHED", "0.001", "3.125", "1.562", "-"],
    ]
    first_row = result.output.index(f"{experiment}-lr0.001")  # newest first
    assert first_row < result.output.index(f"{experiment}-lr0.01 ")


def test_runs_show_the_benchmark_scores_a_run_logged(tmp_path):
    experiment = f"bench-{uuid.uuid4().hex[:6]}"
    run_id = pipeline_run(experiment, "0.01", 2.5, None)
    tracking.log_metrics(run_id, {"pretrained_hs_acc": 0.25, "pretrained_hs_acc_norm": 0.3125})

    result = CliRunner().invoke(app, ["runs", str(write_pipeline_config(tmp_path, experiment))])
    assert result.exit_code == 0, result.output
    header = row_of(result.output, "run")
    assert header[-3:] == ["pretrained_hs_acc", "pretrained_hs_acc_norm", "version"]
    assert row_of(result.output, f"{experiment}-lr0.01")[-3:] == ["0.25", "0.3125", "-"]


def test_runs_compare_puts_two_runs_side_by_side(tmp_path):
    experiment = f"compare-{uuid.uuid4().hex[:6]}"
    first, second = (pipeline_run(experiment, lr, loss, None) for lr, loss in zip(LEARNING_RATES, (2.5, 2.25)))
    result = CliRunner().invoke(app, ["runs", "--experiment", experiment, "--compare", f"{experiment}-lr0.01", second])
    assert result.exit_code == 0, result.output
    assert row_of(result.output, "pretrain.lr")[1:] == ["0.01", "0.003"]
    assert row_of(result.output, "pretrain_val_loss")[1:] == ["2.5", "2.25"]
    assert "max_steps" not in result.output and first != second

    missing = CliRunner().invoke(app, ["runs", "--experiment", experiment, "--compare", "nope", second])
    assert missing.exit_code != 0 and "no pipeline run named 'nope'" in str(missing.exception)
