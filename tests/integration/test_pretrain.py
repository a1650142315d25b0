"""The pretrain stage: its fingerprint, reuse, the torchrun launch with MLflow logging from
rank 0, a cancel that stops every rank at a checkpoint, and the `gptflow pretrain` command."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from model.checkpoint import checkpoint_dirs, load_state
from model.config import ModelConfig
from support import REPO
from support.configs import micro_pretrain_config, write_pipeline_config
from support.corpus import make_shards
from support.processes import GPTFLOW
from support.sigint import with_sigint
from tasks import tracking
from tasks.pretrain import pretrain_fingerprint, run_pretrain
from tasks.shard import ShardOutput

MODEL = ModelConfig(preset=None, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> ShardOutput:
    manifest = make_shards(tmp_path_factory.mktemp("shards"), {"train": 200, "val": 40})
    return ShardOutput(path=manifest.parent, manifest=manifest, fingerprint="micro-shards", report={})


def test_fingerprint_covers_what_decides_the_weights():
    base = pretrain_fingerprint(micro_pretrain_config(), MODEL, "shards-a")
    how_it_runs = dict(
        resume=False, checkpoint_every=7, keep_checkpoints=1, nproc_per_node=2, device="cuda", loader_workers=2
    )
    assert pretrain_fingerprint(micro_pretrain_config(**how_it_runs), MODEL, "shards-a") == base
    assert pretrain_fingerprint(micro_pretrain_config(lr=2e-2), MODEL, "shards-a") != base
    assert pretrain_fingerprint(micro_pretrain_config(max_steps=5), MODEL, "shards-a") != base
    assert pretrain_fingerprint(micro_pretrain_config(), MODEL.model_copy(update={"n_layer": 3}), "shards-a") != base
    assert pretrain_fingerprint(micro_pretrain_config(), MODEL, "shards-b") != base


def test_stage_trains_commits_and_is_reused(tmp_path, shards):
    steps = []
    output = run_pretrain(
        micro_pretrain_config(), MODEL, shards, tmp_path, callback=lambda step, metrics: steps.append(step)
    )
    assert steps == [0, 1, 2, 3, 4]  # 0: the initial weights' validation (eval_at_start)
    assert output.path == tmp_path / "pretrain" / output.fingerprint
    assert output.checkpoint == output.path / "checkpoints" / "step-4"
    assert (output.checkpoint / "model.safetensors").is_file() and (output.path / "manifest.json").is_file()
    assert math.isfinite(output.metrics["val_loss"])
    # The micro stream counts 0..63 over and over: every token id equally often.
    assert output.metrics["unigram_entropy"] == pytest.approx(math.log(64))

    again = run_pretrain(
        micro_pretrain_config(checkpoint_every=1), MODEL, shards, tmp_path, callback=lambda *_: pytest.fail("trained")
    )
    assert again.reused and again.checkpoint == output.checkpoint and again.metrics == output.metrics


CANCELLED_RUN = """
import sys
from pathlib import Path
from tasks.pretrain import PretrainConfig, run_pretrain
from tasks.shard import ShardOutput
from model.config import ModelConfig
config, model, shards = (cls.model_validate_json(Path(p).read_text()) for cls, p in
                         zip((PretrainConfig, ModelConfig, ShardOutput), sys.argv[1:4]))
run_pretrain(config, model, shards, Path(sys.argv[4]), run_id=sys.argv[5])
"""


# Long enough that the cancel lands before the end even when a loaded machine delays the test
# between seeing the first checkpoint and sending SIGINT (micro steps take milliseconds).
STEPS = 200


def test_torchrun_ranks_log_to_mlflow_and_stop_together_on_cancel(tmp_path, shards):
    config = micro_pretrain_config(
        max_steps=STEPS, checkpoint_every=5, keep_checkpoints=2, nproc_per_node=2, eval_every=STEPS // 2
    )
    run_id = tracking.start_run("pretrain-tests", "pretrain")
    arguments = []
    for name, value in (("config", config), ("model", MODEL), ("shards", shards)):
        (tmp_path / f"{name}.json").write_text(value.model_dump_json())
        arguments.append(str(tmp_path / f"{name}.json"))
    checkpoints = tmp_path / "ws" / "pretrain" / pretrain_fingerprint(config, MODEL, shards.fingerprint) / "checkpoints"

    command = [sys.executable, "-c", CANCELLED_RUN, *arguments, str(tmp_path / "ws"), run_id]
    stage = subprocess.Popen(
        with_sigint(command), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 240
    while not (seen := checkpoint_dirs(checkpoints)):  # any: step-5 alone is pruned once step-15 is written
        assert stage.poll() is None and time.monotonic() < deadline, stage.stderr.read()[-3000:]
        time.sleep(0.1)
    stage.send_signal(signal.SIGINT)  # Ctrl-C on the stage's process
    stage.wait(timeout=180)
    assert stage.returncode != 0 and "KeyboardInterrupt" in stage.stderr.read()
    stopped_at = load_state(checkpoint_dirs(checkpoints)[-1])
    first_seen = int(seen[-1].name.removeprefix("step-"))
    assert first_seen < stopped_at["step"] < STEPS  # the checkpoint the cancel wrote, after the one we waited for
    assert stopped_at["world_size"] == 2
    assert not (checkpoints.parent / "manifest.json").exists()

    progress = []  # rank 0's steps, as the task's process sees them
    output = run_pretrain(
        config,
        MODEL,
        shards,
        tmp_path / "ws",
        run_id=run_id,
        progress=lambda step, metrics: progress.append((step, set(metrics))),
    )  # resumes
    assert output.checkpoint == checkpoints / f"step-{STEPS}" and not output.reused
    steps = [step for step, _ in progress]
    assert steps[-1] == STEPS and steps == sorted(set(steps)) and steps[0] > stopped_at["step"]
    assert {"loss", "tokens_per_s"} <= progress[-1][1]
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert sorted(metric.step for metric in history) == list(range(1, STEPS + 1))  # rank 0 only, each step once
    # Step 0: the initial weights' validation, from the first launch (a resume does not validate again).
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")] == [0, STEPS // 2, STEPS]


def test_cli_prepares_data_then_pretrains(tmp_path, cli_env):
    config = write_pipeline_config(tmp_path, "pretrain-cli")
    result = subprocess.run(
        [GPTFLOW, "pretrain", str(config), "--set", "pretrain.max_steps=6"],
        env=cli_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val_loss" in result.stdout and "unigram_entropy" in result.stdout
    [checkpoint] = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("checkpoint ")]
    assert Path(checkpoint).name == "step-6" and (Path(checkpoint) / "model.safetensors").is_file()
    assert Path(checkpoint).parent.name == "checkpoints" and Path(checkpoint).parents[2].name == "pretrain"
    client = MlflowClient()
    experiment = client.get_experiment_by_name("pretrain-cli")
    [stage_run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'pretrain'")
    assert stage_run.data.tags["mlflow.parentRunId"]
    assert stage_run.data.params["pretrain.max_steps"] == "6"  # the --set override, logged as a param
    assert len(client.get_metric_history(stage_run.info.run_id, "loss")) == 6
    # Where it trained and what MFU is against: in the log and the stage run's params.
    params = stage_run.data.params
    assert (params["runtime.device"], params["runtime.device_name"], params["runtime.precision"]) == (
        "cpu",
        "CPU",
        "fp32",
    )
    assert params["runtime.peak_source"] == "measured: torch.float32 matmuls on the CPU"
    assert float(params["runtime.peak_flops"]) > 0 and "device cpu (CPU), fp32, MFU peak" in result.stderr
    assert len(client.get_metric_history(stage_run.info.run_id, "mfu")) == 6
    assert "checkpoint" in [a.path for a in client.list_artifacts(stage_run.info.run_id)]


def points(client, run_id, key) -> list[tuple[int, float]]:
    return sorted((metric.step, metric.value) for metric in client.get_metric_history(run_id, key))


def test_curves_start_at_the_initial_weights_and_carry_no_summary_at_step_0(tmp_path, cli_env):
    """The final figures go to the last step (or a name of their own); step 0 is the initial weights' validation."""
    config = write_pipeline_config(tmp_path, "pretrain-curves")
    overrides = ["pretrain.max_steps=6", "pretrain.eval_every=3"]
    command = [GPTFLOW, "pretrain", str(config), *(arg for o in overrides for arg in ("--set", o))]
    result = subprocess.run(command, env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient()
    experiment = client.get_experiment_by_name("pretrain-curves")
    [stage_run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'pretrain'")
    stage, parent = stage_run.info.run_id, stage_run.data.tags["mlflow.parentRunId"]
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's model-training view

    val = points(client, stage, "val_loss")
    assert sorted({step for step, _ in val}) == [0, 3, 6] and [step for step, _ in val].count(0) == 1
    initial, final = val[0][1], stage_run.data.metrics["val_loss"]
    assert {value for step, value in val if step == 6} == {final}  # the final figure ends the curve
    assert initial > final  # the initial weights' loss, not the final figure
    assert [step for step, _ in points(client, stage, "tokens_per_s")] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in points(client, stage, "mean_tokens_per_s")] == [6]
    assert points(client, parent, "pretrain_val_loss")[0] == (0, initial)
    assert [step for step, _ in points(client, parent, "pretrain_val_loss")].count(0) == 1
    assert all(step > 0 for step, _ in points(client, parent, "pretrain_loss"))
