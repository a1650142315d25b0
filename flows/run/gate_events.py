"""Prefect events that tell automations what the champion gate decided.

After a pipeline registers a new version, it emits `gptflow.model.promoted` when `champion`
moved to it and `gptflow.model.rejected` when the gate kept the champion. The event's
resource is the registered model (`mlflow.registered-model.<name>`), so an automation can
match one model or all of them; Prefect relates it to the emitting flow run. A rerun whose
weights are already registered (no new version, nothing judged) emits neither. docs/operations.md
shows an automation that reacts to them; `scripts/gate_automations.py` creates it.
"""

from __future__ import annotations

from prefect.events import emit_event
from prefect.events.schemas.events import Event

from tasks import tracking
from tasks.register import RegisterOutput

PROMOTED, REJECTED = "gptflow.model.promoted", "gptflow.model.rejected"
RESOURCE_PREFIX = "mlflow.registered-model."


def announce_gate(registered: RegisterOutput, gate_metric: str, mlflow_run_id: str) -> Event | None:
    """Emit the gate's event for the version `registered` names; returns it (None when nothing was judged)."""
    if not registered.judged:
        return None
    return emit_event(
        event=PROMOTED if registered.promoted else REJECTED,
        resource={"prefect.resource.id": RESOURCE_PREFIX + registered.name, "prefect.resource.name": registered.name},
        payload={
            "name": registered.name,
            "version": registered.version,
            "model_uri": registered.model_uri,
            "gate_metric": gate_metric,
            "candidate_value": registered.candidate_value,
            "champion_value": registered.champion_value,  # None: no champion yet, or not comparable
            "champion_version": registered.champion_version,  # after the decision
            "decision": registered.decision,
            "mlflow_run_id": mlflow_run_id,
            "mlflow_run_link": tracking.run_link(mlflow_run_id),
        },
    )
