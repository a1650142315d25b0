"""What every flow does around its stages, alike: the checks before any work, the cancel
watcher, the run title, the parent MLflow run, and the global concurrency limits.

A flow opens `flow_runtime(config)` and runs its stages inside; a training stage runs inside
`holding_gpus(processes)`, which holds slots of the global concurrency limit `gpu` (one slot
per device) so two flow runs never train on one device at once.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime

import torch
from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.utilities.urls import url_for

from flows.pipeline_config import PipelineConfig, load_config
from flows.prepare import check_prepare_config
from flows.run.abandoned_runs import FLOW_RUN_TAG, close_abandoned_runs, process_tags
from flows.run.preflight import check_run
from flows.run.slots import holding
from model.errors import UserError
from tasks import tracking

GPU_LIMIT = "gpu"


@task(name="check-tracking-server", cache_policy=NO_CACHE)
def check_tracking_task(attempts: int) -> str:
    """Fail fast, naming the URI, when MLflow is unreachable (after a bounded retry)."""
    return tracking.check_tracking_server(attempts=attempts)


@contextmanager
def flow_runtime(
    config: PipelineConfig, training: Collection[str] = ("pretrain", "finetune"), finetune_from: str | None = None
) -> Iterator[str]:
    """Around a flow's stages: fail before any work when MLflow is unreachable, the data
    settings are wrong or this machine lacks what the devices settings name (of the training
    stages in `training`; see `flows.run.preflight.check_run`), stop when the flow run is
    cancelled, and hold the flow run's parent MLflow run; yields its id."""
    check_tracking_task(config.tracking_attempts)
    check_prepare_config(config)
    check_run(config, training, finetune_from)
    with stop_when_cancelled(), pipeline_mlflow_run(config) as run_id:
        yield run_id


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
    return f"{name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


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

    A deployment's runner answers a cancel with SIGTERM; a flow run started by a `gptflow`
    command has no runner, so a thread watches its state and sends the SIGTERM itself.
    Prefect turns it into an exception in the main thread; training finishes its step and
    writes a checkpoint first, so a rerun resumes from there.
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


def holding_gpus(processes: int = 1) -> AbstractContextManager[None]:
    """Hold a `gpu` slot per training process (torchrun with N processes holds N devices), at
    most all of them: CPU-only DDP runs several processes on the one "device". The `gpu` limit
    is created on first use with one slot per device, so two training stages never share one."""
    slots = ensure_limit(GPU_LIMIT, device_slots())
    return holding(GPU_LIMIT, min(processes, slots))


def registry_limit(name: str) -> str:
    """A one-slot limit per registered model: pipelines that finish together register and
    gate one after the other, so two of them never both see "no champion yet"."""
    limit = f"registry-{name}"
    ensure_limit(limit, 1)
    return limit
