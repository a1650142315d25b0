"""The ingest in chunks through the prepare flow on processes, and on a Dask cluster reached by
its address (as one of other machines is): the same corpus and manifest as one chunk in one
process (tests/unit/test_ingest_dedup.py checks 1, 2, 3 and more chunks without Prefect, and
the dedup against brute force)."""

from __future__ import annotations

import os
import socket

import pytest

import tasks.ingest
from flows.pipeline_config import load_config
from flows.prepare import prepare_data, prepare_data_locally
from model.errors import UserError
from support.configs import write_data_config
from support.digests import stage_digests
from support.task_runs import recorded_pids, recording_pids, task_runs


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return write_data_config(tmp_path_factory.mktemp("ingest-chunks"))


@pytest.fixture(scope="module")
def one_chunk(config_file, tmp_path_factory):
    """The reference: the default chunk size holds the whole micro corpus, read in one process."""
    return prepare_data_locally(load_config(config_file, [f"workspace={tmp_path_factory.mktemp('one-chunk')}"]))


def planned_chunks(config) -> int:
    """How many chunks the ingest stage cuts the config's source into."""
    return len(tasks.ingest.plan_chunks(config.ingest, tasks.ingest.find_source_files(config.ingest), None, "parts"))


def test_ingest_chunks_on_two_processes_write_the_corpus_of_one_chunk(tmp_path, prefect_server, config_file, one_chunk):
    overrides = [
        f"workspace={tmp_path / 'ws'}",
        "ingest.chunk_bytes=10000",  # 4 chunks of the micro corpus's 77 KB
        "ingest.dedup_buckets=3",
        "task_runner.kind=processes",
        "task_runner.n_workers=2",
    ]
    config = load_config(config_file, overrides)
    state = prepare_data(config, return_state=True)
    prepared = state.result()
    assert stage_digests(prepared) == stage_digests(one_chunk)  # corpus, tokenizer and shards, manifests included
    chunks = planned_chunks(config)
    runs = task_runs(state.state_details.flow_run_id, "ingest-chunk", chunks)
    assert len(runs) == chunks >= 3 and all(run.state.is_completed() for run in runs)


@pytest.fixture(scope="module")
def dask_cluster():
    """A Dask cluster of two worker processes on 127.0.0.1, given to the flow by its scheduler's
    address, as a cluster of other machines is (`task_runner.remote_workers`); the constructor
    returns once the workers are up, and the context closes them."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def on_the_cluster(tmp_path, address: str) -> list[str]:
    return [
        f"workspace={tmp_path / 'ws'}",
        "ingest.chunk_bytes=10000",  # 4 chunks of the micro corpus's 77 KB
        "task_runner.kind=dask",
        f"task_runner.address={address}",
    ]


def test_ingest_chunks_on_a_remote_cluster_write_the_corpus_of_one_process(
    tmp_path, prefect_server, dask_cluster, config_file, one_chunk, monkeypatch
):
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setattr("tasks.ingest.ingest_chunk", recording_pids(tasks.ingest.ingest_chunk, pids))
    config = load_config(config_file, on_the_cluster(tmp_path, dask_cluster))
    state = prepare_data(config, return_state=True)
    prepared = state.result()
    assert stage_digests(prepared) == stage_digests(one_chunk)  # corpus, tokenizer and shards, manifests included
    chunks = planned_chunks(config)
    runs = task_runs(state.state_details.flow_run_id, "ingest-chunk", chunks)
    assert len(runs) == chunks >= 3 and all(run.state.is_completed() for run in runs)
    ran_in = recorded_pids(pids)
    assert ran_in and os.getpid() not in ran_in  # on the cluster's workers, not in the flow's process
    assert not (prepared.corpus.path / "parts").exists()  # the parts in the workspace are deleted


def test_a_source_file_a_remote_worker_cannot_see_stops_the_flow_naming_it_and_the_host(
    tmp_path, prefect_server, dask_cluster, monkeypatch
):
    config_file = write_data_config(tmp_path / "config")  # its own copy of the source: a file goes
    config = load_config(config_file, on_the_cluster(tmp_path, dask_cluster))
    plan = tasks.ingest.plan_chunks
    hidden = []

    def plan_then_hide_a_file(*args):
        """The flow lists the source; a file is gone before the workers read it, as on a
        worker that does not mount the source."""
        chunks = plan(*args)
        hidden.append(chunks[-1].files[0])
        hidden[0].unlink()
        return chunks

    monkeypatch.setattr("tasks.ingest.plan_chunks", plan_then_hide_a_file)
    with pytest.raises(UserError) as error:
        prepare_data(config)
    message = str(error.value)
    assert message.startswith(f"ingest: {hidden[0]}: no such file on {socket.gethostname()}: ")
    assert "a local source must be on storage every worker mounts" in message
    assert not list((tmp_path / "ws" / "ingest").rglob("manifest.json"))
