"""Where task runs execute: the `task_runner:` section of the pipeline config.

`threads` (the default) runs task runs on a thread pool in the flow's process
(Prefect's `ThreadPoolTaskRunner`): no start-up cost, and enough for the 7 MB standard
library, whose ingest is one chunk, and for the shard stage, whose tokenizer releases the GIL.
`processes` runs them on `n_workers` processes of this machine (Prefect's
`ProcessPoolTaskRunner`): the ingest's filters are Python and hold the GIL, so only
processes put more than one core to work on a large corpus; each process takes seconds to
start. `dask` runs them on a Dask cluster through
`prefect-dask`: a temporary `LocalCluster` of `n_workers` processes, or the existing
cluster whose scheduler is at `address` (`tcp://host:8786`), for many processes or
machines. Workers on other machines need the same gptflow installation, a workspace
they can reach (an `s3://` workspace, or a shared filesystem), where the stages' chunks
write their part files, and a local ingest source at the same path as the flow's.

The prepare flow maps the ingest and shard stages' chunks over this runner; the result is
the same whichever runner and however many workers.
"""

from __future__ import annotations

import os
from typing import Literal

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TaskRunnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["threads", "processes", "dask"] = Field(
        "threads", description="threads in this process, processes of this machine, or a Dask cluster"
    )
    n_workers: int | None = Field(
        None, ge=1, description="threads, processes, or local Dask worker processes (default: CPU count)"
    )
    address: str | None = Field(None, description="dask: the scheduler of an existing cluster (default: a local one)")

    @model_validator(mode="after")
    def _address_is_for_dask(self) -> TaskRunnerConfig:
        if self.address and self.kind != "dask":
            raise ValueError("address is the scheduler of a Dask cluster: set kind: dask")
        if self.address and self.n_workers:
            raise ValueError("n_workers sizes a local Dask cluster: leave it out with an address")
        return self

    @property
    def remote_workers(self) -> bool:
        """Whether task runs may execute on other machines."""
        return self.address is not None


def make_task_runner(config: TaskRunnerConfig) -> TaskRunner:
    if config.kind == "threads":
        # Prefect's own default is unbounded: every chunk of a large corpus would start at once,
        # each holding its buffers, for no gain (the ingest's filters hold the GIL).
        return ThreadPoolTaskRunner(max_workers=config.n_workers or os.cpu_count())
    if config.kind == "processes":
        return ProcessPoolTaskRunner(max_workers=config.n_workers)
    from prefect_dask import DaskTaskRunner  # imports dask.distributed: only when asked for

    if config.address:
        return DaskTaskRunner(address=config.address)
    # One thread per worker process: the tokenizer already uses every core it is given.
    cluster = {"threads_per_worker": 1, "dashboard_address": ":0", "processes": True}  # any free port
    if config.n_workers:
        cluster["n_workers"] = config.n_workers
    return DaskTaskRunner(cluster_kwargs=cluster)
