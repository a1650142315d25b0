"""Stage 4, pretrain: shards -> a pretrained GPT, with the engine of `model/train.py`.

With `nproc_per_node: 1` and `nnodes: 1` the engine runs in this process. With more
processes on this machine, the stage launches

    torchrun --standalone --nproc_per_node G -m tasks.pretrain_worker spec.json --result result.json

and with `nnodes: N > 1` machines it joins a c10d rendezvous instead of `--standalone`:

    torchrun --nnodes N --nproc_per_node G --rdzv_backend c10d --rdzv_endpoint HOST:PORT \
        --rdzv_id ID -m tasks.pretrain_worker spec.json --result result.json

and writes `node.sh`, the same launch for each of the other N - 1 machines to run (they must
see the workspace at the same path: docs/multinode.md). The endpoint comes from
`rdzv_endpoint`, else `$GPTFLOW_RDZV_ENDPOINT`, else `$MASTER_ADDR:$MASTER_PORT`; the id
from `rdzv_id`, else `$GPTFLOW_RDZV_ID`, else the stage's fingerprint. The launch runs in a
process group of its own, so a cancel (SIGINT, or Prefect's SIGTERM) stops every local rank
at once; each rank finishes its step and rank 0 writes a checkpoint. Rank 0 logs the step
metrics to the stage's MLflow run, whose id it gets in the environment (`RUN_ID_ENV`).

Output directory `<workspace>/pretrain/<fingerprint>/`:

    spec.json              the engine's RunSpec: resolved model, train config, shards, paths
    node.sh                with nnodes > 1: the launch for the other nodes
    checkpoints/step-N/    model.safetensors, config.json, state.pt (the newest keep_checkpoints)
    metrics.json           final figures: val/train loss, the corpus' unigram entropy, speed
    manifest.json          written last: the final checkpoint's files with their sha256

A run that stopped (cancelled, crashed, a machine restart) continues from its newest
checkpoint when started again (`resume: true`, the default); `resume: false` starts over.
The fingerprint covers what decides the weights: the config without how it runs (resume,
checkpoint cadence, process and node counts, rendezvous, device, loader workers, the
`model.parallel` switches), the model, and the shards.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, NonNegativeInt, PositiveInt

from model.checkpoint import (
    CONFIG,
    WEIGHTS,
    CheckpointTokens,
    attach_tokenizer,
    checkpoint_dirs,
    consolidate,
    read_config,
)
from model.config import RUN_ONLY, ModelConfig
from model.data import ShardManifest, WindowLoader
from model.errors import UserError
from model.scoring import VAL_WINDOWS
from model.special_tokens import special_ids
from model.train import RunSpec, TrainResult, run
from tasks import tracking
from tasks.bpe import load_tokenizer
from tasks.core.checkpoint_mirror import mirrored_checkpoints
from tasks.core.retry import RankFailure
from tasks.core.stage_state import finished
from tasks.core.train_progress import ProgressFileReader, training_progress
from tasks.core.training_stage import Trained, TrainedOutput, TrainingStageConfig, train_once
from tasks.core.workspace import StageDir, fingerprint, write_json_atomic
from tasks.shard import ShardOutput
from tasks.tracking.loss_curves import live_loss_curves
from tasks.tracking.stage_run import Report, log_attempt, stage_run
from tasks.tracking.step_metrics import step_metrics

# 2: optimizer state keyed by parameter name; 3: padded head, chunked loss (new numerics);
# 4: the final checkpoint carries tokenizer.json and tokens.json (self-contained)
FORMAT_VERSION = 4
RUN_ID_ENV = "GPTFLOW_PRETRAIN_RUN_ID"  # the MLflow run the torchrun ranks log to
PROGRESS_FILE_ENV = "GPTFLOW_PROGRESS_FILE"  # where rank 0 writes its latest step for the task's process
PROGRESS_FILE = "progress.json"
PROGRESS_POLL_SECONDS = 1.0
RDZV_ENDPOINT_ENV, RDZV_ID_ENV = "GPTFLOW_RDZV_ENDPOINT", "GPTFLOW_RDZV_ID"
DEFAULT_RDZV_PORT = 29500  # torchrun's MASTER_PORT default
NODE_SCRIPT = "node.sh"  # the launch the other nodes run
STOP_GRACE_SECONDS = 120  # for the ranks to finish a step and checkpoint after a cancel


class PretrainConfig(TrainingStageConfig):
    """The engine's TrainConfig plus the val windows its curve scores and how the stage
    launches it (run-only)."""

    val_windows: PositiveInt | None = Field(
        VAL_WINDOWS, description="val windows scored at each validation, evenly spaced over the split; null: all"
    )

    nproc_per_node: PositiveInt = Field(
        1, description="processes per machine, one per device; > 1 runs torchrun", json_schema_extra=RUN_ONLY
    )
    nnodes: PositiveInt = Field(
        1,
        description="machines; > 1 runs torchrun with a c10d rendezvous (docs/multinode.md)",
        json_schema_extra=RUN_ONLY,
    )
    rdzv_endpoint: str | None = Field(
        None,
        description=f"HOST:PORT on one node, reachable from all; default ${RDZV_ENDPOINT_ENV}, else $MASTER_ADDR",
        json_schema_extra=RUN_ONLY,
    )
    rdzv_id: str | None = Field(
        None,
        description=f"the run's rendezvous id; default ${RDZV_ID_ENV}, else the fingerprint",
        json_schema_extra=RUN_ONLY,
    )
    loader_workers: NonNegativeInt = Field(
        0, description="DataLoader worker processes per rank reading the shards", json_schema_extra=RUN_ONLY
    )


class PretrainOutput(TrainedOutput):
    """The pretrained checkpoint and its figures (val/train loss, unigram entropy, speed)."""


def pretrain_fingerprint(config: PretrainConfig, model: ModelConfig, shards_fingerprint: str) -> str:
    settings = {"pretrain": config.settings(), "model": model.settings()}
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
    progress: Callable[[int, Mapping[str, float]], None] | None = None,
) -> PretrainOutput:
    """Pretrain on `shards`, or reuse the committed result; an unfinished run resumes.

    In process, `callback(step, metrics)` gets the step metrics; under torchrun, rank 0
    logs them to the MLflow run `run_id` instead, and `progress(step, metrics)` gets its
    latest step about every second (to show how far training is).
    """
    stage = StageDir(workspace, "pretrain", pretrain_fingerprint(config, model, shards.fingerprint))

    def train() -> Trained:
        vocab_size = ShardManifest.read(shards.manifest).vocab_size
        init = shards.tokenizer.init_checkpoint if shards.tokenizer is not None else None
        spec = RunSpec(
            model=model.resolve_from(read_config(init)) if init else model.resolve(vocab_size),
            init_from=init,
            train=config.train_config(),
            shards=shards.manifest,
            val_windows=config.val_windows,
            out_dir=stage.path,
            loader_workers=config.loader_workers,
        )
        write_json_atomic(stage.path / "spec.json", spec.model_dump(mode="json"))
        with mirrored_checkpoints(stage, resume=config.resume):
            if config.nproc_per_node == 1 and config.nnodes == 1:
                result = run(spec, callback)
            else:
                launch = torchrun_args(config, stage.path / "spec.json", stage.fingerprint)
                if config.nnodes > 1:
                    write_node_script(stage.path / NODE_SCRIPT, launch, run_id)
                result = run_torchrun(launch, stage.path / "result.json", run_id, progress)
        if config.checkpoint_format == "dcp":  # evaluation and the registry read the weights in one process
            consolidate(result.checkpoint)
        metrics = {
            "val_loss": result.val_loss if result.val_loss is not None else math.nan,
            "train_loss": result.train_loss,
            "unigram_entropy": unigram_entropy(shards.manifest),
            "steps": result.steps,
            # The run's mean, a figure of its own: `tokens_per_s` is the step curve.
            "mean_tokens_per_s": result.tokens / result.seconds if result.seconds else math.nan,
            "seconds": result.seconds,
        }
        files = ["spec.json"]
        if shards.tokenizer is not None:  # the final checkpoint carries what generating with it needs
            tokenizer = shards.tokenizer.local_file(shards.tokenizer.tokenizer, workspace)
            tokens = CheckpointTokens(special_ids=special_ids(load_tokenizer(tokenizer)), prompt_format="document")
            attached = attach_tokenizer(result.checkpoint, tokenizer, tokens)
            files += [path.relative_to(stage.path).as_posix() for path in attached]
        return Trained(checkpoint=result.checkpoint, metrics=metrics, files=files, runtime=result.runtime)

    return train_once(stage, PretrainOutput, FORMAT_VERSION, {"shards": shards.fingerprint}, config.resume, train)


def rendezvous_endpoint(config: PretrainConfig) -> str:
    if config.rdzv_endpoint:
        return config.rdzv_endpoint
    if endpoint := os.environ.get(RDZV_ENDPOINT_ENV):
        return endpoint
    if host := os.environ.get("MASTER_ADDR"):
        return f"{host}:{os.environ.get('MASTER_PORT', DEFAULT_RDZV_PORT)}"
    raise UserError(
        f"pretrain.nnodes is {config.nnodes}: set pretrain.rdzv_endpoint to HOST:PORT of one node that all "
        f"can reach (or {RDZV_ENDPOINT_ENV}, or MASTER_ADDR, in the environment)"
    )


def torchrun_args(config: PretrainConfig, spec: Path, fingerprint: str) -> list[str]:
    """torchrun's arguments for this stage's launch: the same on every node."""
    if config.nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [
            f"--nnodes={config.nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={rendezvous_endpoint(config)}",
            f"--rdzv_id={config.rdzv_id or os.environ.get(RDZV_ID_ENV) or fingerprint}",
        ]
    return [*rendezvous, f"--nproc_per_node={config.nproc_per_node}", "-m", "tasks.pretrain_worker", str(spec)]


def launch_env(run_id: str | None, progress_file: Path | None = None) -> dict[str, str]:
    """What the ranks need besides the spec: where to log, to which run, and where rank 0
    reports its progress."""
    return {
        "MLFLOW_TRACKING_URI": tracking.resolve_tracking_uri(),
        **({RUN_ID_ENV: run_id} if run_id else {}),
        **({PROGRESS_FILE_ENV: str(progress_file)} if progress_file else {}),
    }


def write_node_script(path: Path, launch: list[str], run_id: str | None) -> None:
    """The launch for the other nodes: global rank 0, which logs to MLflow, may be on any of them."""
    env = launch_env(run_id, path.with_name(PROGRESS_FILE))  # read when rank 0 runs here, or the workspace is shared
    values = {name: shlex.quote(value) for name, value in env.items()}
    if urlsplit(env["MLFLOW_TRACKING_URI"]).password:  # no secret is written to the workspace
        values["MLFLOW_TRACKING_URI"] = '"${MLFLOW_TRACKING_URI:?set it as on the first node}"'
    variables = " ".join(f"{name}={value}" for name, value in values.items())
    path.write_text(
        "#!/bin/sh\n# Run on each of the other nodes, with the workspace at the same path (docs/multinode.md).\n"
        f"exec env {variables} torchrun {shlex.join(launch)}\n"
    )
    path.chmod(0o755)
    print(
        f"pretrain: waiting for the other nodes at the rendezvous; on each of them run: sh {path}",
        file=sys.stderr,
        flush=True,
    )


def run_torchrun(
    launch: list[str],
    result_file: Path,
    run_id: str | None,
    progress: Callable[[int, Mapping[str, float]], None] | None = None,
) -> TrainResult:
    """Run torchrun with `launch` on this machine, handing rank 0's progress to `progress`
    while it runs; on a cancel, stop its ranks and wait for their checkpoint."""
    result_file.unlink(missing_ok=True)
    progress_file = result_file.with_name(PROGRESS_FILE)
    progress_file.unlink(missing_ok=True)  # a resumed run's old steps are not this launch's
    reader = ProgressFileReader(progress_file, progress or (lambda step, metrics: None))
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "--result", str(result_file)]
    launcher = subprocess.Popen(
        command, env={**os.environ, **launch_env(run_id, progress_file)}, start_new_session=True
    )
    try:
        while True:
            try:
                exit_code = launcher.wait(timeout=PROGRESS_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                reader.poll()
        reader.poll()
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
    failed = f"pretraining under torchrun ({shlex.join(launch[:-3])}) failed with exit code {exit_code}"
    if "error" in outcome:  # the ranks reported a user error (or a non-finite loss): a retry would repeat it
        raise UserError(f"{failed}: {outcome['error']}")
    # A rank died (killed, a lost node, a device or NCCL failure) or was stopped from outside.
    raise RankFailure(f"{failed}: {outcome.get('interrupted') or 'a rank died; see the ranks output above'}")


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
    params = {"pretrain": config.model_dump(mode="json"), "model": model.model_dump(mode="json")}
    with stage_run(parent_run_id, "pretrain", params, system_metrics=True) as stage:
        log_attempt(stage.run_id)
        tracking.log_dataset(stage.run_id, "shards", shards.fingerprint, shards.path, "pretrain")
        curves_on_pipeline_run = {"loss": "pretrain_loss", "val_loss": "pretrain_val_loss"}
        with (
            live_loss_curves(stage, "pretrain", curves_on_pipeline_run),
            training_progress("pretrain", config.max_steps, logger.info) as progress,
            step_metrics(stage.run_id, progress.update) as on_step,
        ):
            output = run_pretrain(
                config, model, shards, workspace, run_id=stage.run_id, callback=on_step, progress=progress.update
            )
        if not output.reused:  # the checkpoints this run wrote and kept
            tracking.log_checkpoints(stage.run_id, "pretrain", checkpoint_dirs(output.checkpoint.parent))
        if output.runtime is not None:
            logger.info("pretrain: %s", output.runtime.describe())
            tracking.log_params(stage.run_id, {"runtime": output.runtime.model_dump()})
        figures = "\n".join(f"| {name} | {value:.4g} |" for name, value in output.metrics.items())
        stage.finish(
            output.metrics,
            parent_metrics={f"pretrain_{name}": output.metrics[name] for name in ("val_loss", "train_loss")},
            artifacts={
                output.checkpoint / WEIGHTS: "checkpoint",
                output.checkpoint / CONFIG: "checkpoint",
                output.path / "metrics.json": None,
            },
            report=Report(
                "pretrain",
                f"# Pretraining\n\n| figure | value |\n|---|---|\n{figures}\n\nCheckpoint: "
                f"`{output.checkpoint}`{' (reused)' if output.reused else ''}\n",
                "pretraining figures: validation loss against the unigram entropy",
            ),
            step=int(output.metrics["steps"]),  # `val_loss` ends its curve there
        )
    return finished(output)
