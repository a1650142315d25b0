"""Start again a flow run whose process died before the flow began.

A served or worker-run deployment starts each flow run in a fresh process, whose first call
asks the Prefect server for its API version. Prefect's client retries a refused connection
only once it has connected (it fails fast on a wrong URL), so a run that comes due while the
server restarts dies at that first call, and the runner reports it Crashed: a scheduled run
lost to a few seconds of server downtime (found by `bench/soak.py`'s Prefect restart).

Such a run never entered Running, so nothing of it was done and starting it again loses
nothing. The runner calls this flow's `on_crashed` hooks in the serving (or worker) process
after it reports the crash; the hook puts the run back in Scheduled a few seconds later, and
the runner starts it again. A run that ran is left Crashed (a rerun resumes from the stages'
manifests, the user's call), and so is one that crashed before starting `MAX_STARTS` times:
its process fails for a reason a retry would repeat (a broken installation, say).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prefect import Flow, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.logging import get_logger
from prefect.states import AwaitingRetry, State, StateType

MAX_STARTS = 3  # a run whose process dies before its flow begins is started at most this often
START_AGAIN_AFTER = timedelta(seconds=10)

logger = get_logger("gptflow.crashed_starts")


def start_again_if_it_never_ran(flow: Flow, flow_run: FlowRun, state: State) -> None:
    """An `on_crashed` hook: schedule `flow_run` again if its flow never began."""
    with get_client(sync_client=True) as client:
        history = client.read_flow_run_states(flow_run.id)
        if any(past.type == StateType.RUNNING for past in history):
            return
        crashes = sum(past.type == StateType.CRASHED for past in history)
        if crashes >= MAX_STARTS:
            logger.error(
                "Flow run %r crashed %d times before its flow began; it stays Crashed (%s)",
                flow_run.name,
                crashes,
                state.message,
            )
            return
        again = datetime.now(UTC) + START_AGAIN_AFTER
        client.set_flow_run_state(
            flow_run.id,
            AwaitingRetry(scheduled_time=again, message=f"its process died before the flow began: {state.message}"),
            force=True,
        )
    logger.warning(
        "Flow run %r crashed before its flow began (%s); scheduled again at %s UTC",
        flow_run.name,
        state.message,
        f"{again:%H:%M:%S}",
    )
