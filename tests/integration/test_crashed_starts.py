"""A served flow run whose process dies before the flow begins is started again, once per
death up to a bound; one that ran is left Crashed (flows/run/crashed_starts.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from uuid import UUID

from prefect import flow, get_client
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed, Pending, Running

from flows.run.crashed_starts import MAX_STARTS, start_again_if_it_never_ran
from support.servers import stop, wait_for

# The served flow's file. The serving process starts each flow run in a child process, spawned,
# which loads this file again as `__mp_main__`; the child dies there as long as `dies-at-start` holds a number above
# 0, counting it down, as one that cannot reach the Prefect server dies at its first call.
SERVED = textwrap.dedent(
    """
    from pathlib import Path

    from prefect import flow

    from flows.run.crashed_starts import start_again_if_it_never_ran

    DEATHS = Path(__file__).with_name("dies-at-start")
    if __name__ == "__mp_main__" and (left := int(DEATHS.read_text())) > 0:
        DEATHS.write_text(str(left - 1))
        raise SystemExit(1)


    @flow(name="starts-late", on_crashed=[start_again_if_it_never_ran])
    def starts_late() -> int:
        return 42


    if __name__ == "__main__":
        starts_late.serve(name="served")
    """
)


HOOK_DONE = "Hook 'start_again_if_it_never_ran' finished running successfully"


def served(tmp_path, prefect_server: str, deaths: int) -> tuple[subprocess.Popen, UUID]:
    """Serve the flow from `tmp_path`, its first `deaths` starts dying; start one run of it."""
    (tmp_path / "starts_late.py").write_text(SERVED)
    (tmp_path / "dies-at-start").write_text(str(deaths))
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PYTHONPATH": os.getcwd()}
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "starts_late.py"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    with get_client(sync_client=True) as client:
        deployment = wait_for(lambda: deployment_named(client, "starts-late/served"), 120, "the served deployment")
        run = client.create_flow_run_from_deployment(deployment.id)
    return process, run.id


def deployment_named(client, name: str):
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        return None


def states_of(flow_run_id: UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        return [state.name for state in client.read_flow_run_states(flow_run_id)]


def test_a_run_that_died_before_its_flow_began_is_started_again(prefect_server, tmp_path):
    process, flow_run_id = served(tmp_path, prefect_server, deaths=1)
    try:
        names = wait_for(lambda: (names := states_of(flow_run_id))[-1] == "Completed" and names, 240, "Completed")
    finally:
        stop(process)
    assert names.count("Crashed") == 1 and names.index("Crashed") < names.index("AwaitingRetry"), names
    assert names.index("AwaitingRetry") < names.index("Running"), names


def test_a_run_that_dies_at_every_start_stays_crashed_after_the_bound(prefect_server, tmp_path):
    process, flow_run_id = served(tmp_path, prefect_server, deaths=MAX_STARTS + 5)
    log = tmp_path / "serve.log"
    try:
        # The hook has had its say on each crash once the serving process says so MAX_STARTS times.
        wait_for(lambda: log.read_text().count(HOOK_DONE) == MAX_STARTS, 300, f"{MAX_STARTS} crash hooks")
    finally:
        stop(process)
    names = states_of(flow_run_id)
    assert names[-1] == "Crashed" and names.count("Crashed") == MAX_STARTS and "Running" not in names, names
    assert (tmp_path / "dies-at-start").read_text() == "5"  # started exactly MAX_STARTS times


@flow(name="ran-then-crashed")
def ran_then_crashed() -> None:
    pass


def test_a_run_that_ran_stays_crashed(prefect_server):
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(ran_then_crashed)
        for state in (Pending(), Running(), Crashed(message="the process was killed")):
            client.set_flow_run_state(run.id, state, force=True)
        crashed = client.read_flow_run(run.id)
        start_again_if_it_never_ran(ran_then_crashed, crashed, crashed.state)
        assert client.read_flow_run(run.id).state.name == "Crashed"
