"""A run killed with SIGKILL on the embedded Prefect server (no server configured) leaves
neither its server process nor its `gpu` slot behind: a rerun with the same PREFECT_HOME
proceeds (flows/run/slots.py, ops/embedded_server.py). A run waiting for a slot says so in
gptflow's words, without Prefect's ERROR line at each try."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
from prefect import flow, get_client
from prefect.concurrency.sync import concurrency
from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

from flows.run import slots
from flows.run.context import ensure_limit
from support.configs import write_pipeline_config
from support.processes import GPTFLOW


def embedded_servers(pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(pid).children(recursive=True) if "uvicorn" in " ".join(p.cmdline())]


async def run_out(leases: ConcurrencyLeaseStorage) -> None:
    """End the one active lease now, as its renewals stopping would within a minute (Prefect's
    shortest lease): the test need not wait for the clock."""
    [lease_id] = await leases.read_active_lease_ids()
    assert await leases.renew_lease(lease_id, timedelta(0))


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"no {what}: " + log.read_text()[-3000:]
        time.sleep(0.2)


@pytest.mark.slow
def test_a_run_after_a_sigkill_on_the_embedded_server_proceeds_and_no_server_is_orphaned(tmp_path):
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    env.pop("PREFECT_API_URL", None)  # the embedded default, as a new user has it
    config = write_pipeline_config(tmp_path, name="leases")
    endless = ["--set=pretrain.max_steps=100000", "--set=pretrain.checkpoint_every=5", "--set=finetune=null"]
    killed_log, next_log = tmp_path / "killed.log", tmp_path / "next.log"
    with open(killed_log, "w") as log:
        killed = subprocess.Popen(
            [GPTFLOW, "pretrain", str(config), *endless], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    checkpoints = tmp_path / "workspace" / "pretrain"
    wait_for(lambda: list(checkpoints.glob("*/checkpoints/step-*")), "checkpoint", killed, killed_log)
    servers = embedded_servers(killed.pid)
    assert servers, "the run should talk to an embedded server"

    # The next run (another config: the first trains for ever) needs the same `gpu` slot: it waits, saying why.
    with open(next_log, "w") as log:
        command = [GPTFLOW, "pretrain", str(config), "--set=pretrain.max_steps=10", "--set=finetune=null"]
        following = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    waiting = "waiting for 1 slot(s) of concurrency limit 'gpu' (1 of 1 slots taken), held by flow run 'leases-"
    wait_for(lambda: waiting in next_log.read_text(), "waiting message", following, next_log)

    killed.kill()  # SIGKILL while holding the `gpu` slot: no exit handler runs
    killed.wait()
    gone, alive = psutil.wait_procs(servers, timeout=30)
    assert not alive, "the killed run's embedded server outlived it"
    asyncio.run(run_out(ConcurrencyLeaseStorage(tmp_path / "prefect" / "concurrency_leases")))

    assert following.wait(timeout=600) == 0, next_log.read_text()[-4000:]
    output = next_log.read_text()
    assert "reclaimed 1 expired concurrency lease" in output
    assert " since " in next(line for line in output.splitlines() if waiting in line)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_wait_for_a_slot_that_another_run_holds_logs_no_prefect_error(prefect_server, monkeypatch):
    limit = f"quiet-{uuid.uuid4().hex[:8]}"
    ensure_limit(limit, 1)
    with get_client(sync_client=True) as client:  # another holder: its lease taken through the API
        held = client.increment_concurrency_slots_with_lease(
            names=[limit], slots=1, mode="concurrency", lease_duration=60
        ).json()["lease_id"]

        # Each try for the slot ends at its timeout (1 s here, not 15) and Prefect's slot service
        # logs that; at the third try the other holder lets go, and the try gets the slot.
        tries = 0

        def counted_try(*args, **kwargs):
            nonlocal tries
            tries += 1
            if tries == 3:
                client.release_concurrency_slots_with_lease(held)
            return concurrency(*args, **kwargs)

        monkeypatch.setattr(slots, "concurrency", counted_try)
        monkeypatch.setattr(slots, "TRY_SECONDS", 1)

        @flow(name="waits-for-a-slot")
        def waits_for_a_slot() -> None:
            with slots.holding(limit):
                pass

        records = Records()
        watched = [logging.getLogger(name) for name in (slots.SLOT_SERVICE_LOGGER, "prefect.flow_runs")]
        for logger in watched:
            logger.addHandler(records)
        try:
            waits_for_a_slot()
        finally:
            for logger in watched:
                logger.removeHandler(records)

    assert tries == 3
    messages = [(record.levelname, record.getMessage()) for record in records.records]
    assert any(level == "WARNING" and "waiting for 1 slot(s) of concurrency limit" in text for level, text in messages)
    assert not [text for level, text in messages if level == "ERROR"], messages
