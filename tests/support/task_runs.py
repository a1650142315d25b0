"""Where a flow's task runs ran: their Prefect records, and the processes that ran them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def task_runs(flow_run_id, prefix: str) -> list:
    """The task runs of a flow run whose names start with `prefix` (`ingest-chunk`, `shard-chunk`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run for run in runs if run.name.startswith(prefix)]


def recording_pids(function: Callable[..., Any], pids: Path) -> Callable[..., Any]:
    """`function`, leaving an empty file named after the id of each process it runs in under
    `pids`. Patched over a task's helper, it travels to Dask workers by value, as cloudpickle
    sends the task's function, so it records there too."""

    def run_and_record(*args: Any) -> Any:
        (pids / str(os.getpid())).touch()
        return function(*args)

    return run_and_record


def recorded_pids(pids: Path) -> set[int]:
    return {int(path.name) for path in pids.iterdir()}
