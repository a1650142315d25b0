"""Training stages retry a lost rank and resume from the newest checkpoint, to the weights of
an uninterrupted run; a non-finite loss or a bad config fails at once (tasks/core/retry.py)."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient
from prefect import flow
from safetensors.torch import load_file

from flows.pipeline_config import load_config
from flows.prepare import prepare_data_locally
from flows.run.training import retrying
from model.checkpoint import WEIGHTS
from model.errors import UserError
from model.train import NonFiniteLoss
from support.configs import write_pipeline_config
from tasks import pretrain, tracking
from tasks.core.retry import RankFailure

FAIL_AT_STEP = 7  # after the checkpoint of step 5: the retry resumes from there


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("retry")
    overrides = ["pretrain.checkpoint_every=5", "pretrain.retry_delay_seconds=0", "finetune=null"]
    config = load_config(write_pipeline_config(root, name="retry"), overrides)
    return config, prepare_data_locally(config)


def pretrain_failing_once(config, shards, workspace, error: Exception, monkeypatch):
    """The retrying pretrain task in a flow, its first attempt failing with `error` at FAIL_AT_STEP;
    returns the steps each attempt ran, the flow's final state and the parent MLflow run."""
    engine, attempts = pretrain.run, []

    def flaky(spec, callback):
        attempts.append([])

        def on_step(step, metrics):
            attempts[-1].append(step)
            callback(step, metrics)
            if len(attempts) == 1 and step == FAIL_AT_STEP:
                raise error

        return engine(spec, on_step)

    monkeypatch.setattr(pretrain, "run", flaky)
    parent = tracking.start_run(config.name, "pipeline")

    @flow
    def pretraining():
        return retrying(pretrain.pretrain_task, config.pretrain)(
            config.pretrain, config.model, shards, workspace, parent_run_id=parent
        )

    state = pretraining(return_state=True)
    tracking.end_run(parent)
    return attempts, state, parent


def test_a_lost_rank_retries_and_resumes_to_the_uninterrupted_weights(prefect_server, micro, tmp_path, monkeypatch):
    config, prepared = micro
    lost_rank = RankFailure("pretraining under torchrun failed with exit code -9: a rank died")
    attempts, state, parent = pretrain_failing_once(
        config, prepared.shards, tmp_path / "retried", lost_rank, monkeypatch
    )
    assert state.is_completed() and len(attempts) == 2
    assert attempts[0][-1] == FAIL_AT_STEP and attempts[1][0] == 6  # resumed from the checkpoint of step 5
    retried = state.result()
    monkeypatch.undo()
    uninterrupted = pretrain.run_pretrain(config.pretrain, config.model, prepared.shards, tmp_path / "uninterrupted")

    expected, got = load_file(uninterrupted.checkpoint / WEIGHTS), load_file(retried.checkpoint / WEIGHTS)
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)
    assert [p.name for p in (retried.path / "checkpoints").iterdir()] and retried.metrics["steps"] == 20
    client = MlflowClient(tracking.resolve_tracking_uri())
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_attempt = sorted(runs, key=lambda run: run.info.start_time)
    assert [run.info.status for run in by_attempt] == ["FAILED", "FINISHED"]
    assert by_attempt[1].data.tags["gptflow.attempt"] == "2" and by_attempt[1].data.metrics["attempt"] == 2


@pytest.mark.parametrize("error", [NonFiniteLoss("loss is nan at step 7"), UserError("pretrain.lr: not a number")])
def test_a_non_finite_loss_or_a_user_error_does_not_retry(prefect_server, micro, tmp_path, monkeypatch, error):
    config, prepared = micro
    attempts, state, _ = pretrain_failing_once(config, prepared.shards, tmp_path / "failed", error, monkeypatch)
    assert len(attempts) == 1 and state.is_failed()
