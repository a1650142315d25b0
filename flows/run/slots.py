"""Slots of Prefect's global concurrency limits that a killed process cannot keep for ever.

A process holds slots under a lease that it renews while it runs; when it dies (SIGKILL, the
OOM killer, a lost machine) the lease expires and Prefect's `repossessor` service gives its
slots back. That service runs in a real Prefect server (`gptflow up`, infra/), but not in the
embedded (ephemeral) server a flow starts when none is configured, and Prefect's default lease
storage is the granting server's memory, which dies with it. So a run killed while training on
the embedded default kept the `gpu` slot for ever, and every later run waited, silently.

Decision: lease on every server, and reclaim expired leases on the embedded one as well,
rather than not leasing there. Processes that share a PREFECT_HOME each start an embedded
server over one database, and the limits are what keep two of them off one device; not
leasing would keep a killed run's slot for ever all the same. So gptflow keeps leases in files
under PREFECT_HOME (Prefect's filesystem lease storage, set in ops/environment.py), where
they outlive the server that granted them, and on the embedded server it revokes expired
leases itself, with the repossessor's own function, before each try for a slot.

A run that waits for slots logs, once a minute, which limit, held by which flow run, since when;
Prefect's own ERROR line at the end of each try for slots is dropped (`WithoutSlotWaitErrors`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime

from prefect import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import AcquireConcurrencySlotTimeoutError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from prefect.utilities.asyncutils import run_coro_as_sync

# Prefect's shortest lease (the API refuses less). A killed holder's slots are free this long
# after its last renewal; the renewals run at three quarters of it.
LEASE_SECONDS = 60
# How long one try for slots waits before expired leases are looked for again.
TRY_SECONDS = 15
REPORT_SECONDS = 60  # a waiting run says so once a minute


class WithoutSlotWaitErrors(logging.Filter):
    """Prefect's slot service logs `Service 'ConcurrencySlotAcquisitionWithLeaseService' failed
    to process item ...` at ERROR whenever a try for slots ends, its timeout included; waiting
    in tries of TRY_SECONDS, a healthy wait printed that every 15 s. The caller gets the same
    failure as an exception (a timeout here means: try again; anything else fails the run with
    its own traceback), so the line tells nothing new and is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.levelno == logging.ERROR and args[:1] == ("ConcurrencySlotAcquisitionWithLeaseService",))


WITHOUT_SLOT_WAIT_ERRORS = WithoutSlotWaitErrors()  # one instance: addFilter skips a repeat
SLOT_SERVICE_LOGGER = "prefect._internal.concurrency"  # where that service logs


def on_embedded_server() -> bool:
    """Whether flows talk to the embedded server (no PREFECT_API_URL), which runs no repossessor."""
    return not PREFECT_API_URL.value()


async def _reclaim_expired_leases() -> int:
    # The repossessor's own revocation, run here against the embedded server's database and
    # lease files: both live under PREFECT_HOME, as every embedded server on this machine sees them.
    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage
    from prefect.server.database import provide_database_interface
    from prefect.server.services.repossessor import revoke_expired_lease

    storage, db = get_concurrency_lease_storage(), provide_database_interface()
    expired = await storage.read_expired_lease_ids()
    for lease_id in expired:
        await revoke_expired_lease(lease_id, db=db, lease_storage=storage)
    return len(expired)


def reclaim_expired_leases() -> int:
    """Give back the slots of leases that expired (their holder died); returns how many leases."""
    return run_coro_as_sync(_reclaim_expired_leases())


async def _holders(limit: str) -> list[str]:
    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage

    storage = get_concurrency_lease_storage()
    async with get_client() as client:
        limit_id = (await client.read_global_concurrency_limit_by_name(limit)).id
        described = []
        for lease_id, holder in await storage.list_holders_for_limit(limit_id):
            lease = await storage.read_lease(lease_id)
            since = f"{lease.created_at:%Y-%m-%d %H:%M:%S} UTC" if lease else "an unknown time"
            try:
                name = f"flow run '{(await client.read_flow_run(holder.id)).name}' ({holder.id})"
            except ObjectNotFound:
                name = f"{holder.type} {holder.id}"
            described.append(f"{name} since {since}")
        return described


def waiting_message(limit: str, slots: int) -> str | None:
    """Which limit a run waits for, who holds it and since when (when this machine can see the
    leases); None when `slots` of it are free."""
    with get_client(sync_client=True) as client:
        state = client.read_global_concurrency_limit_by_name(limit)
    if state.active_slots + slots <= state.limit:
        return None
    taken = f"{state.active_slots} of {state.limit} slots taken"
    try:
        holders = run_coro_as_sync(_holders(limit))
    except (OSError, ObjectNotFound):
        holders = []
    # A remote server keeps its leases to itself: then only the count is known.
    held_by = "; ".join(holders) or "holders that this machine cannot see"
    return f"waiting for {slots} slot(s) of concurrency limit '{limit}' ({taken}), held by {held_by}"


@contextmanager
def holding(limit: str, slots: int = 1) -> Iterator[None]:
    """Hold `slots` of global concurrency limit `limit` for the block, waiting for them.

    The lease is renewed while the block runs, so a process killed while holding slots frees
    them a minute later. A renewal that fails (the Prefect server briefly away) is logged and
    the block goes on: losing days of training to a monitoring outage is worse than briefly
    exceeding the limit.
    """
    logger = get_run_logger()  # the flow run's log: the UI shows why it waits
    logging.getLogger(SLOT_SERVICE_LOGGER).addFilter(WITHOUT_SLOT_WAIT_ERRORS)
    holder = ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id)
    last_report = None
    with ExitStack() as held:
        while True:
            if on_embedded_server() and (reclaimed := reclaim_expired_leases()):
                logger.warning(
                    "reclaimed %d expired concurrency lease(s) of processes that stopped renewing them", reclaimed
                )
            due = last_report is None or time.monotonic() - last_report >= REPORT_SECONDS
            if due and (waiting := waiting_message(limit, slots)):
                logger.warning("%s (at %s)", waiting, f"{datetime.now(UTC):%H:%M:%S} UTC")
                last_report = time.monotonic()
            try:
                held.enter_context(
                    concurrency(
                        limit,
                        occupy=slots,
                        strict=True,
                        lease_duration=LEASE_SECONDS,
                        timeout_seconds=TRY_SECONDS,
                        holder=holder,
                        raise_on_lease_renewal_failure=False,
                    )
                )
                break
            except AcquireConcurrencySlotTimeoutError:  # look for expired leases, then try again
                pass
        yield
