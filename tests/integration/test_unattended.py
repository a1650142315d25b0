"""What an unattended run shows in Prefect: a reused stage ends `Cached` naming its directory,
and each config's reports keep their own artifact keys."""

from __future__ import annotations

from prefect import flow, get_client
from prefect.artifacts import Artifact

from support.corpus import write_python_modules
from support.servers import wait_for
from tasks import tracking
from tasks.ingest import IngestConfig, ingest_task
from tasks.tracking.stage_run import Report, artifact_key, stage_run


def final_states(*states) -> list | None:
    """The server's record of the task runs' states, once it holds a final one for each: a task
    run reports its states as events, which the server records after the flow may have returned."""
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            recorded = [client.read_task_run(state.state_details.task_run_id).state for state in states]
        except ObjectNotFound:
            return None
    return recorded if all(state is not None and state.is_final() for state in recorded) else None


def test_a_reused_stage_ends_cached_naming_its_directory(prefect_server, tmp_path):
    corpus = write_python_modules(tmp_path / "corpus", files=12)
    config = IngestConfig(source=str(corpus), min_chars=16, val_fraction=0.25)

    @flow
    def ingest_twice():
        return [ingest_task(config, tmp_path / "workspace", return_state=True) for _ in range(2)]

    built, reused = ingest_twice()
    directory = built.result().path
    assert not built.result().reused and reused.result().path == directory
    recorded = wait_for(lambda: final_states(built, reused), 60, "both task runs' final states", every=0.2)
    assert [state.name for state in recorded] == ["Completed", "Cached"]
    assert recorded[1].is_completed() and recorded[1].message == f"reused {directory}"


def test_two_configs_reports_land_under_their_own_keys(prefect_server):
    @flow
    def report_in(experiment: str) -> None:
        parent = tracking.start_run(experiment, "pipeline")
        with stage_run(parent, "pretrain", {}) as stage:
            stage.finish({}, {}, {}, report=Report("pretrain", f"# Pretraining of {experiment}\n", "figures"))
        tracking.end_run(parent)

    for experiment in ("keys-alpha", "keys-beta"):
        report_in(experiment)
    for experiment in ("keys-alpha", "keys-beta"):
        artifact = Artifact.get(artifact_key(experiment, "pretrain"))
        assert artifact is not None and artifact.data.startswith(f"# Pretraining of {experiment}\n")
    assert Artifact.get("pretrain") is None


def test_the_gate_automations_are_created_for_both_events(prefect_server):
    from prefect.automations import Automation

    from flows.run.gate_automations import automation_name, create_gate_automations
    from flows.run.gate_events import PROMOTED, REJECTED

    create_gate_automations("https://hooks.example.com/gptflow")
    created = create_gate_automations("https://hooks.example.com/gptflow")  # again: replaced, not doubled
    for event, automation in zip((PROMOTED, REJECTED), created, strict=True):
        read = Automation.read(name=automation_name(event))
        assert read.id == automation.id and read.trigger.expect == {event}
        assert read.actions[0].type == "send-notification" and "event.payload.version" in read.actions[0].body
