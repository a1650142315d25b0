"""Create the Prefect automation that tells a team what the champion gate decided.

    python scripts/gate_automations.py --webhook https://hooks.example.com/gptflow

saves a webhook notification block and one automation per gate event
(flows/run/gate_events.py): `gptflow.model.promoted` and `gptflow.model.rejected` of any
registered model send the model, version, both figures and the MLflow run to the webhook
(Slack, Teams, or anything that takes a JSON POST). Run it again to update them: the block
and the automations are replaced by name. It talks to the Prefect server in use
(PREFECT_API_URL, else a `gptflow up` server): automations need a server that stays up.
"""

from __future__ import annotations

import argparse

from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture

from flows.run.gate_events import PROMOTED, REJECTED, RESOURCE_PREFIX

BLOCK_NAME = "gptflow-gate-webhook"
# Prefect renders the body with the triggering event in scope.
BODY = (
    "{{ event.event }}: {{ event.payload.name }} version {{ event.payload.version }} "
    "({{ event.payload.gate_metric }} {{ event.payload.candidate_value }} vs champion "
    "{{ event.payload.champion_value }}): {{ event.payload.decision }}. MLflow: {{ event.payload.mlflow_run_link }}"
)


def automation_name(event: str) -> str:
    return f"gptflow: notify on {event}"


def create_gate_automations(webhook_url: str) -> list[Automation]:
    """The webhook block and an automation per gate event, replacing earlier ones of the same names."""
    block = CustomWebhookNotificationBlock(
        name=BLOCK_NAME, url=webhook_url, json_data={"text": "{{body}}"}, allow_private_urls=True
    )
    block_id = block.save(BLOCK_NAME, overwrite=True)
    created = []
    for event in (PROMOTED, REJECTED):
        try:
            Automation.read(name=automation_name(event)).delete()
        except ValueError:  # not created yet
            pass
        automation = Automation(
            name=automation_name(event),
            description="Sends the champion gate's decision to the team's webhook (flows/run/gate_automations.py)",
            trigger=EventTrigger(
                expect={event},
                match={"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[SendNotification(block_document_id=block_id, subject=f"gptflow: {event}", body=BODY)],
        )
        created.append(automation.create())
    return created


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webhook", required=True, help="URL that receives the notifications as a JSON POST")
    for automation in create_gate_automations(parser.parse_args().webhook):
        print(f"created automation {automation.name!r} ({automation.id})")
