"""`gptflow finetune` and `gptflow evaluate` end to end on the micro pipeline config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from support.configs import write_pipeline_config
from support.processes import GPTFLOW

pytestmark = pytest.mark.slow


def gptflow(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([GPTFLOW, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def nested_runs(experiment: str, run_name: str) -> list:
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], f"attributes.run_name = '{run_name}'")


def test_cli_finetunes_the_pretraining_output_then_evaluates_it(tmp_path, cli_env):
    config = str(write_pipeline_config(tmp_path, "finetune-cli"))
    result = gptflow("finetune", config, "--set", "pretrain.max_steps=4", env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finetuned_completion_loss" in result.stdout and "pretrained_parse_rate" in result.stdout
    [checkpoint] = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("checkpoint ")]
    assert Path(checkpoint).parts[-4] == "finetune" and Path(checkpoint).name == "step-5"
    [finetune_run] = nested_runs("finetune-cli", "finetune")
    assert finetune_run.data.tags["mlflow.parentRunId"] and "finetuned_completion_loss" in finetune_run.data.metrics
    assert len(nested_runs("finetune-cli", "pretrain")) == 1  # the pretraining output it started from

    result = gptflow("evaluate", config, checkpoint, "--set", "pretrain.max_steps=4", env=cli_env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_bits_per_byte" in result.stdout and "doc_perplexity" in result.stdout
    [samples] = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("samples ")]
    assert "def plus" in Path(samples).read_text()
    [evaluate_run] = nested_runs("finetune-cli", "evaluate")
    parent = MlflowClient().get_run(evaluate_run.data.tags["mlflow.parentRunId"])
    assert parent.data.metrics["val_bits_per_byte"] == pytest.approx(evaluate_run.data.metrics["val_bits_per_byte"])


def test_cli_names_a_model_that_is_not_a_checkpoint(tmp_path, cli_env):
    config = str(write_pipeline_config(tmp_path, "evaluate-cli"))
    result = gptflow("evaluate", config, str(tmp_path / "nowhere"), env=cli_env, cwd=tmp_path)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: {tmp_path / 'nowhere'}: not a checkpoint directory "
        "(no model.safetensors, no checkpoints/step-N under it)"
    )
