"""The ingest in chunks through the prepare flow on processes: the same corpus and manifest as one
chunk in one process (tests/unit/test_ingest_dedup.py checks 1, 2, 3 and more chunks without
Prefect, and the dedup against brute force)."""

from __future__ import annotations

from flows.pipeline_config import load_config
from flows.prepare import prepare_data, prepare_data_locally
from support.configs import write_data_config
from support.digests import stage_digests


def task_runs(flow_run_id, prefix: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run for run in runs if run.name.startswith(prefix)]


def test_ingest_chunks_on_two_processes_write_the_corpus_of_one_chunk(tmp_path, prefect_server):
    config_file = write_data_config(tmp_path / "config")
    one_chunk = prepare_data_locally(load_config(config_file, [f"workspace={tmp_path / 'one'}"]))
    overrides = [
        f"workspace={tmp_path / 'ws'}",
        "ingest.chunk_bytes=10000",  # 4 chunks of the micro corpus's 77 KB
        "ingest.dedup_buckets=3",
        "task_runner.kind=processes",
        "task_runner.n_workers=2",
    ]
    state = prepare_data(load_config(config_file, overrides), return_state=True)
    prepared = state.result()
    assert stage_digests(prepared) == stage_digests(one_chunk)  # corpus, tokenizer and shards, manifests included
    runs = task_runs(state.state_details.flow_run_id, "ingest-chunk")
    assert len(runs) >= 3 and all(run.state.is_completed() for run in runs)
