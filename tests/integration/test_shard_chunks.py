"""The shard stage in chunks: the same bytes for any chunk count, task runner or worker count.

The reference is the stage run as one chunk in one process, whose stream and windows
tests/unit/test_shard.py checks against the tokenizer directly.
"""

from __future__ import annotations

import math
import os

import pytest

import tasks.shard
from flows.pipeline_config import load_config
from flows.prepare import prepare_data, prepare_data_locally
from model.errors import UserError
from support.configs import write_data_config
from support.digests import stage_digests


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return write_data_config(tmp_path_factory.mktemp("chunks"))


@pytest.fixture(scope="module")
def one_chunk(config_file, tmp_path_factory):
    """The reference: the default chunk size holds the whole micro corpus."""
    prepared = prepare_data_locally(load_config(config_file, [f"workspace={tmp_path_factory.mktemp('one-chunk')}"]))
    assert prepared.corpus.report["documents_out"] < load_config(config_file).shard.chunk_documents
    return prepared


@pytest.mark.parametrize("chunk_documents", [1, 3])
def test_several_chunks_write_the_same_files_and_manifest_as_one(tmp_path, config_file, one_chunk, chunk_documents):
    config = load_config(config_file, [f"workspace={tmp_path}", f"shard.chunk_documents={chunk_documents}"])
    prepared = prepare_data_locally(config)
    assert (
        prepared.corpus.report["documents_out"] > 2 * chunk_documents
    )  # 3 chunks or more; with 1, some hold one split only
    assert prepared.shards.fingerprint == one_chunk.shards.fingerprint  # the chunking is not part of it
    assert stage_digests(prepared)["shard"] == stage_digests(one_chunk)["shard"]  # manifest.json included
    assert not (prepared.shards.path / "parts").exists()


def chunk_task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run for run in runs if run.name.startswith("shard-chunk")]


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_the_flow_runs_the_chunks_as_task_runs_on_the_configured_runner(
    tmp_path, config_file, one_chunk, prefect_server, monkeypatch, runner
):
    # Each chunk leaves the id of the process it ran in (the wrapper travels to Dask
    # workers by value, as cloudpickle sends the task's function).
    pids = tmp_path / "pids"
    pids.mkdir()
    encode = tasks.shard.encode_chunk

    def encode_and_record_pid(chunk):
        (pids / str(os.getpid())).touch()
        return encode(chunk)

    monkeypatch.setattr("tasks.shard.encode_chunk", encode_and_record_pid)
    overrides = [
        f"workspace={tmp_path / 'ws'}",
        "shard.chunk_documents=2",
        f"task_runner.kind={runner}",
        "task_runner.n_workers=2",
    ]
    state = prepare_data(load_config(config_file, overrides), return_state=True)
    prepared = state.result()
    assert stage_digests(prepared)["shard"] == stage_digests(one_chunk)["shard"]
    runs = chunk_task_runs(state.state_details.flow_run_id)
    assert len(runs) == math.ceil(prepared.corpus.report["documents_out"] / 2) > 1
    assert all(run.state.is_completed() for run in runs)
    ran_in = {int(path.name) for path in pids.iterdir()}
    assert ran_in == {os.getpid()} if runner == "threads" else os.getpid() not in ran_in and ran_in


def test_a_scheduler_address_without_dask_is_refused_naming_the_fields(config_file):
    with pytest.raises(
        UserError, match=r"field 'task_runner': .*address is the scheduler of a Dask cluster: set kind: dask"
    ):
        load_config(config_file, ["task_runner.address=tcp://127.0.0.1:8786"])
    assert load_config(
        config_file, ["task_runner.kind=dask", "task_runner.address=tcp://127.0.0.1:8786"]
    ).task_runner.remote_workers
