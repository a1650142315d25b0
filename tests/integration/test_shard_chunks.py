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
from support.task_runs import recorded_pids, recording_pids, task_runs


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


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_the_flow_runs_the_chunks_as_task_runs_on_the_configured_runner(
    tmp_path, config_file, one_chunk, prefect_server, monkeypatch, runner
):
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr("tasks.shard.encode_chunk", recording_pids(tasks.shard.encode_chunk, pids))
    overrides = [
        f"workspace={tmp_path / 'ws'}",
        "shard.chunk_documents=2",
        f"task_runner.kind={runner}",
        "task_runner.n_workers=2",
    ]
    state = prepare_data(load_config(config_file, overrides), return_state=True)
    prepared = state.result()
    assert stage_digests(prepared)["shard"] == stage_digests(one_chunk)["shard"]
    chunks = math.ceil(prepared.corpus.report["documents_out"] / 2)
    runs = task_runs(state.state_details.flow_run_id, "shard-chunk", chunks)
    assert len(runs) == chunks > 1 and all(run.state.is_completed() for run in runs)
    ran_in = recorded_pids(pids)
    assert ran_in == {os.getpid()} if runner == "threads" else os.getpid() not in ran_in and ran_in


def test_a_scheduler_address_without_dask_is_refused_naming_the_fields(config_file):
    with pytest.raises(
        UserError, match=r"field 'task_runner': .*address is the scheduler of a Dask cluster: set kind: dask"
    ):
        load_config(config_file, ["task_runner.address=tcp://127.0.0.1:8786"])
    assert load_config(
        config_file, ["task_runner.kind=dask", "task_runner.address=tcp://127.0.0.1:8786"]
    ).task_runner.remote_workers
