"""Stage 4, pretrain: shards -> a pretrained GPT, with the engine of `model/train.py`.

With `nproc_per_node: 1` the engine runs in this process. With more, the stage launches

    torchrun --standalone --nproc_per_node N -m tasks.pretrain_worker spec.json --result result.json

in a process group of its own, so a cancel (SIGINT, or Prefect's SIGTERM) stops every rank
at once; each rank finishes its step and rank 0 writes a checkpoint. Rank 0 logs the step
metrics to the stage's MLflow run, whose id it gets in the environment (`RUN_ID_ENV`).

Output directory `<workspace>/pretrain/<fingerprint>/`:

    spec.json              the engine's RunSpec: resolved model, train config, shards, paths
    checkpoints/step-N/    model.safetensors, config.json, state.pt (the newest keep_checkpoints)
    metrics.json           final figures: val/train loss, the corpus' unigram entropy, speed
    manifest.json          written last: the final checkpoint's files with their sha256

A run that stopped (cancelled, crashed, a machine restart) continues from its newest
checkpoint when started again (`resume: true`, the default); `resume: false` starts over.
The fingerprint covers what decides the weights: the config without how it runs (resume,
checkpoint cadence, process count, device, loader workers), the model, and the shards.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, NonNegativeInt, PositiveInt

from model.checkpoint import CONFIG, WEIGHTS
from model.config import ModelConfig
from model.data import WindowLoader
from model.errors import UserError
from model.train import RunSpec, TrainConfig, TrainResult, run
from tasks import tracking
from tasks.shard import ShardOutput
from tasks.workspace import StageDir, fingerprint, sha256_file, write_json_atomic

FORMAT_VERSION = 1
RUN_ID_ENV = "GPTFLOW_PRETRAIN_RUN_ID"  # the MLflow run the torchrun ranks log to
# PretrainConfig fields that decide how the run executes, not the weights it produces.
RUN_ONLY_FIELDS = {"resume", "checkpoint_every", "keep_checkpoints", "nproc_per_node", "device", "loader_workers"}
STOP_GRACE_SECONDS = 120  # for the ranks to finish a step and checkpoint after a cancel


class PretrainConfig(TrainConfig):
    """The engine's TrainConfig plus how the stage launches it."""

    nproc_per_node: PositiveInt = Field(1, description="processes on this machine, one per device; > 1 runs torchrun + DDP")
    loader_workers: NonNegativeInt = Field(0, description="DataLoader worker processes per rank reading the shards")

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))


class PretrainOutput(BaseModel):
    path: Path  # the stage directory
    fingerprint: str
    checkpoint: Path  # the final checkpoint, a `step-N/` directory
    metrics: dict[str, float]
    reused: bool = False


def pretrain_fingerprint(config: PretrainConfig, model: ModelConfig, shards_fingerprint: str) -> str:
    settings = {"pretrain": config.model_dump(mode="json", exclude=RUN_ONLY_FIELDS), "model": model.model_dump(mode="json")}
    return fingerprint("pretrain", settings, {"shards": shards_fingerprint}, FORMAT_VERSION)


def unigram_entropy(manifest: Path, split: str = "train", windows_per_read: int = 4096) -> float:
    """Entropy in nats of the split's token frequencies: the loss of a model that ignores context."""
    loader = WindowLoader(manifest, split, batch_size=1, shuffle=False)
    counts = np.zeros(loader.vocab_size, dtype=np.int64)
    for start in range(0, loader.num_windows, windows_per_read):
        windows = loader.source.windows(start, min(windows_per_read, loader.num_windows - start))
        counts += np.bincount(windows[:, 1:].ravel(), minlength=loader.vocab_size)  # targets: each stream token once
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_pretrain(
    config: PretrainConfig,
    model: ModelConfig,
    shards: ShardOutput,
    workspace: Path,
    run_id: str | None = None,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
) -> PretrainOutput:
    """Pretrain on `shards`, or reuse the committed result; an unfinished run resumes.

    In process, `callback(step, metrics)` gets the step metrics; under torchrun, rank 0
    logs them to the MLflow run `run_id` instead.
    """
    stage = StageDir(Path(workspace).resolve(), "pretrain", pretrain_fingerprint(config, model, shards.fingerprint))
    with stage.lock():
        if stage.is_complete():
            manifest = stage.read_manifest()
            return PretrainOutput(path=stage.path, fingerprint=stage.fingerprint, checkpoint=stage.path / manifest["checkpoint"],
                                  metrics=manifest["metrics"], reused=True)
        if not config.resume:
            stage.reset()
        stage.path.mkdir(parents=True, exist_ok=True)  # not reset: its checkpoints are the resume point

        vocab_size = json.loads(Path(shards.manifest).read_text())["vocab_size"]
        spec = RunSpec(model=model.resolve(vocab_size), train=config.train_config(), shards=shards.manifest,
                       out_dir=stage.path, loader_workers=config.loader_workers)
        write_json_atomic(stage.path / "spec.json", spec.model_dump(mode="json"))
        if config.nproc_per_node == 1:
            result = run(spec, callback)
        else:
            result = run_torchrun(stage.path / "spec.json", config.nproc_per_node, run_id)

        metrics = {
            "val_loss": result.val_loss if result.val_loss is not None else math.nan,
            "train_loss": result.train_loss,
            "unigram_entropy": unigram_entropy(shards.manifest),
            "steps": result.steps,
            "tokens_per_s": result.tokens / result.seconds if result.seconds else math.nan,
            "seconds": result.seconds,
        }
        write_json_atomic(stage.path / "metrics.json", metrics)
        checkpoint = result.checkpoint.relative_to(stage.path).as_posix()
        listed = ["spec.json", "metrics.json", f"{checkpoint}/{WEIGHTS}", f"{checkpoint}/{CONFIG}"]
        stage.commit({
            "format": FORMAT_VERSION,
            "fingerprint": stage.fingerprint,
            "inputs": {"shards": shards.fingerprint},
            "checkpoint": checkpoint,
            "metrics": metrics,
            "files": [{"path": name, "sha256": sha256_file(stage.path / name)} for name in listed],
        })
    return PretrainOutput(path=stage.path, fingerprint=stage.fingerprint, checkpoint=result.checkpoint, metrics=metrics)


def run_torchrun(spec: Path, nproc: int, run_id: str | None) -> TrainResult:
    """Run the engine on `nproc` local ranks; on a cancel, stop them all and wait for their checkpoint."""
    result_file = spec.with_name("result.json")
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "tasks.pretrain_worker", str(spec), "--result", str(result_file),
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.resolve_tracking_uri()}
    if run_id:
        env[RUN_ID_ENV] = run_id
    launcher = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        exit_code = launcher.wait()
    except BaseException:  # Ctrl-C, or Prefect cancelling the flow run
        os.killpg(launcher.pid, signal.SIGTERM)
        try:
            launcher.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
        raise
    outcome = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if exit_code == 0 and "checkpoint" in outcome:
        return TrainResult.model_validate(outcome)
    detail = outcome.get("error") or outcome.get("interrupted") or "see the ranks' output above"
    raise UserError(f"pretraining under torchrun ({nproc} processes) failed with exit code {exit_code}: {detail}")


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(
    config: PretrainConfig,
    model: ModelConfig,
    shards: ShardOutput,
    workspace: Path,
    parent_run_id: str,
) -> PretrainOutput:
    """`run_pretrain` in a nested MLflow run: params, live step metrics, final figures, the checkpoint."""
    logger = get_run_logger()
    with tracking.child_run(parent_run_id, "pretrain") as run_id:
        tracking.log_params(run_id, {"pretrain": config.model_dump(mode="json"), "model": model.model_dump(mode="json")})
        tracking.log_dataset(run_id, "shards", shards.fingerprint, shards.path, "pretrain")
        with tracking.MetricsLogger(run_id) as metrics_logger:

            def on_step(step: int, metrics: Mapping[str, float]) -> None:
                metrics_logger(step, metrics)
                if step % 10 == 0 or step == config.max_steps or "val_loss" in metrics:
                    logger.info("step %d/%d: %s", step, config.max_steps,
                                " ".join(f"{key} {value:.4g}" for key, value in metrics.items()))

            output = run_pretrain(config, model, shards, workspace, run_id=run_id, callback=on_step)
        tracking.log_metrics(run_id, output.metrics)
        tracking.log_metrics(parent_run_id, {f"pretrain_{name}": output.metrics[name] for name in ("val_loss", "train_loss")})
        tracking.log_artifact(run_id, output.checkpoint / WEIGHTS, "checkpoint")
        tracking.log_artifact(run_id, output.checkpoint / CONFIG, "checkpoint")
        tracking.log_artifact(run_id, output.path / "metrics.json")
    figures = "\n".join(f"| {name} | {value:.4g} |" for name, value in output.metrics.items())
    create_markdown_artifact(
        key="pretrain",
        markdown=f"# Pretraining\n\n| figure | value |\n|---|---|\n{figures}\n\nCheckpoint: `{output.checkpoint}`"
        f"{' (reused)' if output.reused else ''}\n\nMLflow run: {tracking.run_link(run_id)}\n",
        description="pretraining figures: validation loss against the unigram entropy",
    )
    return output
