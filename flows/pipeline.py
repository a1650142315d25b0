"""The end-to-end pipeline: data -> pretrain -> evaluate -> finetune -> evaluate -> register.

One Prefect flow, `pipeline`, with the data stages as the `prepare-data` subflow. Tasks
pass paths and small records. Every stage skips when its manifest exists and verifies, so
a rerun after a failure resumes at the failed stage (training from its newest
checkpoint). Training stages hold a slot of the global concurrency limit `gpu` (one slot
per device) so two pipelines never train on one device at once.

MLflow: one parent run per flow run, tagged with the Prefect flow-run id and UI link,
holding the resolved config and the headline figures; a nested run per stage. The flow
run publishes a markdown artifact with the key figures and the MLflow link.
"""

# No `from __future__ import annotations`: Prefect validates the flow's parameters against
# its annotations, and a deployment loads this file where string annotations do not resolve.
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path

import torch
from prefect import flow, get_client, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for
from pydantic import BaseModel

from flows.config import PipelineConfig, load_config
from flows.abandoned_runs import FLOW_RUN_TAG, close_abandoned_runs, process_tags
from flows.preflight import check_run
from flows.prepare import artifact_key, check_prepare_config, prepare_data
from model.errors import UserError
from tasks import tracking
from tasks.evaluate import EvaluateOutput, evaluate_task
from tasks.finetune import finetune_task
from tasks.loss_curves import loss_curves_task
from tasks.pretrain import pretrain_task
from tasks.register import EvalData, RegisterOutput, register_task

GPU_LIMIT = "gpu"
LEASE_SECONDS = 60


class PipelineResult(BaseModel):
    mlflow_run_id: str
    mlflow_run_link: str
    final_checkpoint: Path
    metrics: dict[str, float]
    registered: RegisterOutput


@task(name="check-tracking-server", cache_policy=NO_CACHE)
def check_tracking_task() -> str:
    """Fail fast, naming the URI, when MLflow is unreachable (after a bounded retry)."""
    return tracking.check_tracking_server()


def device_slots() -> int:
    """One `gpu` slot per device this machine trains on (the CPU counts as one)."""
    return max(1, torch.cuda.device_count())


def ensure_limit(name: str, slots: int) -> int:
    """Create a global concurrency limit on first use (an existing one is kept as set);
    returns its number of slots."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:  # another pipeline created it a moment ago
            pass
        return client.read_global_concurrency_limit_by_name(name).limit


def ensure_gpu_limit() -> int:
    """The `gpu` limit, one slot per device, so two training stages never share a device."""
    return ensure_limit(GPU_LIMIT, device_slots())


def holding(limit: str, slots: int = 1) -> AbstractContextManager[None]:
    """Hold `slots` of global concurrency limit `limit` for the block, waiting for them.

    The lease is renewed every 45 s while the block runs, so a process killed while holding
    slots frees them about a minute later (Prefect's default lease, 300 s, would block the
    next pipeline for five). A renewal that fails (the Prefect server briefly away) is
    logged and training goes on: losing days of training to a monitoring outage is worse
    than briefly exceeding the limit.
    """
    return concurrency(limit, occupy=slots, strict=True, lease_duration=LEASE_SECONDS,
                       raise_on_lease_renewal_failure=False)  # fmt: skip


def registry_limit(name: str) -> str:
    """A one-slot limit per registered model: pipelines that finish together register and
    gate one after the other, so two of them never both see "no champion yet"."""
    limit = f"registry-{name}"
    ensure_limit(limit, 1)
    return limit


@contextmanager
def pipeline_mlflow_run(config: PipelineConfig) -> Iterator[str]:
    """The flow run's MLflow parent run: tagged with the Prefect run and the process,
    holding the config. Runs that earlier flow runs left open are closed first."""
    close_abandoned_runs(config.name, closed_by=str(flow_run.id))
    tags = {FLOW_RUN_TAG: str(flow_run.id), "prefect.flow_run_name": str(flow_run.name), **process_tags()}
    # `prefect.runtime.flow_run.ui_url` is Prefect Cloud's path; url_for gives the server UI's page.
    if link := url_for("flow-run", obj_id=flow_run.id):
        tags["prefect.flow_run_url"] = link
    run_id = tracking.start_run(config.name, str(flow_run.name), tags=tags)
    with tracking.ending(run_id):
        resolved = config.model_dump(mode="json")
        tracking.log_params(run_id, resolved)
        tracking.log_dict(run_id, resolved, "config.yaml")
        yield run_id


@contextmanager
def stop_when_cancelled(poll_seconds: float = 5.0) -> Iterator[None]:
    """Stop this process like a runner would when the flow run is cancelled in the UI.

    A deployment's runner answers a cancel with SIGTERM; a flow run started by
    `gptflow run` has no runner, so a thread watches its state and sends the SIGTERM
    itself. Prefect turns it into an exception in the main thread; training finishes its
    step and writes a checkpoint first, so a rerun resumes from there.
    """
    run_id, stopped = flow_run.id, threading.Event()

    def watch() -> None:
        with get_client(sync_client=True) as client:
            while not stopped.wait(poll_seconds):
                state = client.read_flow_run(run_id).state
                if state is not None and (state.is_cancelling() or state.is_cancelled()):
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    watcher = threading.Thread(target=watch, name="cancel-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stopped.set()


def summary_markdown(config: PipelineConfig, result: PipelineResult, evaluations: dict[str, EvaluateOutput]) -> str:
    rows = "".join(
        f"| {stage} | {figure} | {output.metrics[figure]:.4f} |\n"
        for stage, output in evaluations.items()
        for figure in ("val_loss", "val_perplexity", "val_bits_per_byte", "doc_bits_per_byte")
        if figure in output.metrics
    )
    registered = result.registered
    return (
        f"# Pipeline `{config.name}`\n\n"
        f"| evaluation | figure | value |\n|---|---|---|\n{rows}\n"
        f"**Registered:** `{registered.model_uri}` (alias `candidate`); champion is version "
        f"{registered.champion_version}.\n\n**Gate:** {registered.decision}\n\n"
        f"**MLflow run:** {result.mlflow_run_link}\n"
    )


def flow_run_title() -> str:
    """`<config name>-<UTC time>`: what the Prefect UI lists and the MLflow parent run is called."""
    parameters = flow_run.parameters
    config = parameters.get("config")
    if isinstance(config, PipelineConfig):
        name = config.name
    else:
        try:
            name = load_config(config, parameters.get("overrides") or ()).name
        except UserError:  # the flow itself reports the problem
            name = "pipeline"
    return f"{name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


@flow(name="pipeline", flow_run_name=flow_run_title)
def pipeline(config: PipelineConfig | str | Path = "configs/tiny.yaml", overrides: list[str] | None = None) -> PipelineResult:
    """Corpus to registered model; `config` is a YAML path or a PipelineConfig."""
    if not isinstance(config, PipelineConfig):
        config = load_config(config, overrides or ())
    check_tracking_task()
    check_prepare_config(config)
    check_run(config)
    gpu_slots = ensure_gpu_limit()
    workspace = config.workspace

    with stop_when_cancelled(), pipeline_mlflow_run(config) as run_id:
        data = prepare_data(config, parent_run_id=run_id)
        corpus, tokenizer, shards = data.corpus, data.tokenizer, data.shards

        def evaluate(label: str, checkpoint: Path) -> EvaluateOutput:
            """One evaluation, named after the model it scores in Prefect and MLflow alike."""
            name = f"evaluate-{label}"
            return evaluate_task.with_options(task_run_name=name)(
                config.evaluate, checkpoint, tokenizer.tokenizer, shards.path, corpus.corpus, workspace,
                parent_run_id=run_id, device=config.device, run_name=name, parent_prefix=f"{label}_",
            )  # fmt: skip

        # A slot per training process (torchrun with N processes holds N devices), at most
        # all of them: CPU-only DDP runs several processes on the one "device".
        with holding(GPU_LIMIT, min(config.pretrain.nproc_per_node, gpu_slots)):
            pretrained = pretrain_task(config.pretrain, config.model, shards, workspace, parent_run_id=run_id)
        evaluations = {"pretrained": evaluate("pretrained", pretrained.checkpoint)}
        final_checkpoint = pretrained.checkpoint
        if config.finetune is not None:
            with holding(GPU_LIMIT):
                # A registered model named in the config wins over this run's pretraining output.
                base_model = config.finetune.start_from or pretrained.checkpoint
                finetuned = finetune_task(
                    config.finetune, base_model, tokenizer.tokenizer, corpus.corpus, workspace, parent_run_id=run_id
                )
            evaluations["finetuned"] = evaluate("finetuned", finetuned.checkpoint)
            final_checkpoint = finetuned.checkpoint

        loss_curves_task(run_id)
        final = evaluations["finetuned" if config.finetune is not None else "pretrained"]
        lineage = {
            "data_fingerprint": corpus.fingerprint,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "shards_fingerprint": shards.fingerprint,
            "prefect_flow_run_id": str(flow_run.id),
        }
        with holding(registry_limit(config.name)):
            registered = register_task(
                config.register, config.name, final_checkpoint, tokenizer.tokenizer, final.metrics, lineage,
                EvalData(config.evaluate, shards.path, corpus.corpus), parent_run_id=run_id, device=config.device,
            )  # fmt: skip
        result = PipelineResult(
            mlflow_run_id=run_id,
            mlflow_run_link=tracking.run_link(run_id),
            final_checkpoint=final_checkpoint,
            metrics=final.metrics,
            registered=registered,
        )
    create_markdown_artifact(
        key=artifact_key(config.name, "pipeline"),
        markdown=summary_markdown(config, result, evaluations),
        description=f"Key figures of pipeline `{config.name}` and its MLflow run",
    )
    return result
