"""Where a flow's task runs ran: their Prefect records, and the processes that ran them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.servers import wait_for


def task_runs(flow_run_id, prefix: str, count: int) -> list:
    """The `count` task runs of a flow run whose names start with `prefix` (`ingest-chunk`,
    `shard-chunk`), once the server has recorded a final state for each. A task run reports
    its states as events, which the server records on its own time: when the flow returns,
    a task run's record may not exist yet, or have no state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def recorded() -> list | None:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        runs = [run for run in runs if run.name.startswith(prefix)]
        final = len(runs) >= count and all(run.state is not None and run.state.is_final() for run in runs)
        return runs if final else None

    return wait_for(recorded, 60, f"{count} {prefix} task runs in a final state", every=0.2)


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
