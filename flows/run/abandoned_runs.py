"""Close the MLflow runs an earlier flow run left open.

A run is ended by the process that opened it (`tracking.ending`). When that process dies
(SIGKILL, the OOM killer, a lost machine), or loses the tracking server for longer than
MLflow's client keeps retrying, nothing ends its runs, and the UI shows them RUNNING for
ever. The next flow run on the same experiment ends them as FAILED, each tagged with why,
when it can tell that their flow run is over:

- the Prefect flow run they belong to is in a final state, or no longer exists; or
- they were opened on this machine by a process that no longer exists (a SIGKILLed
  `gptflow run` leaves its Prefect flow run RUNNING too).

A run whose flow run may still be going (started on another machine, or alive here) is
left alone: two pipelines may share an experiment.
"""

from __future__ import annotations

import os
import socket
from uuid import UUID

import psutil
from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import ObjectNotFound

from tasks import tracking

FLOW_RUN_TAG = "prefect.flow_run_id"
HOST_TAG, PID_TAG, STARTED_TAG = "gptflow.host", "gptflow.pid", "gptflow.process_started"


def process_tags() -> dict[str, str]:
    """Which process opened a run: its machine, pid and start time (pids are reused)."""
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        STARTED_TAG: f"{psutil.Process().create_time():.2f}",
    }


def process_gone(tags: dict[str, str]) -> bool:
    """True when the run was opened on this machine by a process that has since ended."""
    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return False  # another machine's process: nothing here can tell
    try:
        return f"{psutil.Process(int(tags[PID_TAG])).create_time():.2f}" != tags.get(STARTED_TAG)
    except psutil.NoSuchProcess:
        return True


def flow_run_ended(flow_run_id: str) -> str | None:
    """The final state of the Prefect flow run ("FAILED", "CRASHED", ...); None while it runs."""
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(UUID(flow_run_id)).state
        except (ObjectNotFound, ValueError):
            return "gone"
    return state.type.value if state is not None and state.is_final() else None


def abandonment(tags: dict[str, str]) -> str | None:
    """Why the run's flow run is over, or None if it may still be running."""
    flow_run_id = tags.get(FLOW_RUN_TAG)
    if flow_run_id and (final := flow_run_ended(flow_run_id)):
        return f"its Prefect flow run {flow_run_id} is {final} but never closed this run"
    if process_gone(tags):
        return f"process {tags[PID_TAG]} on {tags[HOST_TAG]} that opened it is gone"
    return None


@task(name="close-abandoned-runs", cache_policy=NO_CACHE)
def close_abandoned_runs(experiment: str, closed_by: str) -> list[str]:
    """End as FAILED the runs of `experiment` whose flow run is over; returns their ids."""
    logger, closed = get_run_logger(), []
    for run in tracking.open_top_level_runs(experiment):
        if reason := abandonment(run.data.tags):
            ids = tracking.close_abandoned(run.info.run_id, f"{reason}; closed by flow run {closed_by}")
            logger.warning(
                "MLflow run %s (%s) and %d nested: FAILED, because %s",
                run.info.run_id,
                run.info.run_name,
                len(ids) - 1,
                reason,
            )
            closed += ids
    return closed
