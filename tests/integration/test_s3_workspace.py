"""An `s3://` workspace, against a real S3 API: moto's server on 127.0.0.1.

Each test plays one or more machines, each with its own local cache (`GPTFLOW_CACHE`);
the reference is the same data prepared into a local workspace.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from flows.pipeline_config import load_config
from flows.plan import plan
from flows.prepare import PreparedData, prepare_data_locally
from model.errors import UserError
from support.configs import write_data_config, write_pipeline_config
from support.digests import file_digests, stage_digests
from support.ports import free_port
from tasks.core.storage import RemoteStore
from tasks.core.workspace import MANIFEST
from tasks.ingest import ingest_chunk, run_ingest
from tasks.pretrain import run_pretrain
from tasks.shard import encode_chunk, run_shard

BUCKET = "gptflow-test"
MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port, with one bucket; stopped by its PID."""
    port = free_port()
    server = subprocess.Popen(
        [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as env:
            for name, value in {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }.items():
                env.setenv(name, value)
            pafs.S3FileSystem(
                endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
            ).create_dir(BUCKET)
            yield
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    return write_data_config(tmp_path_factory.mktemp("s3"))


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> PreparedData:
    """The same data prepared into a local workspace."""
    return prepare_data_locally(load_config(config_file, [f"workspace={tmp_path_factory.mktemp('local')}"]))


def on_machine(monkeypatch, tmp_path: Path, name: str) -> Path:
    """From now on, this process is machine `name`: its own, empty, local cache."""
    cache = tmp_path / f"cache-{name}"
    monkeypatch.setenv("GPTFLOW_CACHE", str(cache))
    return cache


def prepare_remote(config_file: Path, prefix: str, *overrides: str) -> PreparedData:
    return prepare_data_locally(load_config(config_file, [f"workspace=s3://{BUCKET}/{prefix}", *overrides]))


def remote_stage(prefix: str, stage: str, fingerprint: str) -> RemoteStore:
    return RemoteStore(f"s3://{BUCKET}/{prefix}/{stage}/{fingerprint}")


def assert_remote_matches(prefix: str, reference: PreparedData) -> None:
    """Every file of every stage is in the bucket with the bytes of the local reference."""
    for stage, output in reference.stages().items():
        remote = remote_stage(prefix, stage, output.fingerprint)
        for name, digest in file_digests(output.path).items():
            assert hashlib.sha256(remote.read_bytes(name)).hexdigest() == digest, f"{stage}/{name}"


def test_prepare_into_s3_uploads_every_stage_and_reads_it_from_local_paths(
    s3, tmp_path, monkeypatch, config_file, reference
):
    cache = on_machine(monkeypatch, tmp_path, "a")
    prepared = prepare_remote(config_file, "run-a")
    assert not any(output.reused for output in prepared.stages().values())
    assert prepared.shards.manifest.is_relative_to(cache) and prepared.shards.manifest.is_file()
    assert stage_digests(prepared) == stage_digests(reference)
    assert_remote_matches("run-a", reference)


def test_another_machine_reuses_every_stage_from_the_remote_manifests(
    s3, tmp_path, monkeypatch, config_file, reference
):
    on_machine(monkeypatch, tmp_path, "a")
    prepare_remote(config_file, "run-b")
    cache = on_machine(monkeypatch, tmp_path, "b")
    for work in ("tasks.ingest.write_corpus", "tasks.bpe.train", "tasks.shard.load_tokenizer"):
        monkeypatch.setattr(work, lambda *args, **kwargs: pytest.fail("a reused stage did work"))
    reused = prepare_remote(config_file, "run-b")
    assert all(output.reused for output in reused.stages().values())
    assert reused.corpus.corpus.is_relative_to(cache)
    assert stage_digests(reused) == stage_digests(reference)  # downloaded whole, manifests included


def test_files_without_a_manifest_are_ignored_and_overwritten(s3, tmp_path, monkeypatch, config_file, reference):
    on_machine(monkeypatch, tmp_path, "a")
    junk = tmp_path / "junk"
    junk.write_bytes(b"half an upload from a crashed run")
    for stage, output in reference.stages().items():  # the same fingerprints as on S3
        for name in file_digests(output.path):
            if name != MANIFEST:
                remote_stage("run-c", stage, output.fingerprint).upload(junk, name)
    prepared = prepare_remote(config_file, "run-c")
    assert not any(output.reused for output in prepared.stages().values())
    assert_remote_matches("run-c", reference)


def test_a_tampered_remote_file_is_refused_by_name(s3, tmp_path, monkeypatch, config_file, reference):
    on_machine(monkeypatch, tmp_path, "a")
    prepare_remote(config_file, "run-d")
    shards = remote_stage("run-d", "shard", reference.shards.fingerprint)
    tampered = tmp_path / "tampered.parquet"
    tampered.write_bytes(
        bytearray(b ^ 1 if i == 100 else b for i, b in enumerate(shards.read_bytes("train-00001.parquet")))
    )
    shards.upload(tampered, "train-00001.parquet")
    on_machine(monkeypatch, tmp_path, "b")
    name = f"s3://{BUCKET}/run-d/shard/{reference.shards.fingerprint}/train-00001.parquet"
    with pytest.raises(UserError, match=rf"{name}: contents do not match the sha256"):
        prepare_remote(config_file, "run-d")
    assert shards.exists(MANIFEST)  # nothing is deleted


def test_chunks_on_other_machines_fetch_their_inputs_and_share_parts_through_s3(
    s3, tmp_path, monkeypatch, config_file, reference
):
    on_machine(monkeypatch, tmp_path, "a")
    prepared = prepare_remote(config_file, "run-e")
    config = load_config(config_file, [f"workspace=s3://{BUCKET}/run-e", "shard.seq_len=16", "shard.chunk_documents=3"])
    worker_cache = tmp_path / "cache-worker"

    def on_a_worker_elsewhere(chunks):
        """The chunks as a worker on another machine sees them: the flow machine's paths
        do not exist there, and it has its own cache."""
        elsewhere = Path("/nonexistent/machine-a")

        def moved(output, file_field):
            path = elsewhere / output.path.parent.name / output.fingerprint
            return output.model_copy(update={"path": path, file_field: path / getattr(output, file_field).name})

        with pytest.MonkeyPatch.context() as worker:
            worker.setenv("GPTFLOW_CACHE", str(worker_cache))
            chunks = [
                chunk.model_copy(
                    update={"corpus": moved(chunk.corpus, "corpus"), "tokenizer": moved(chunk.tokenizer, "tokenizer")}
                )
                for chunk in chunks
            ]
            return [encode_chunk(chunk) for chunk in chunks]

    shards = run_shard(
        config.shard,
        prepared.corpus,
        prepared.tokenizer,
        config.workspace,
        map_chunks=on_a_worker_elsewhere,
        parts_in_workspace=True,
    )
    local = load_config(config_file, [f"workspace={tmp_path / 'local'}", "shard.seq_len=16"])
    expected = run_shard(local.shard, reference.corpus, reference.tokenizer, local.workspace)
    assert file_digests(shards.path) == file_digests(expected.path)
    assert (
        worker_cache / "s3" / BUCKET / "run-e" / "ingest" / prepared.corpus.fingerprint / "corpus.parquet"
    ).is_file()
    assert not remote_stage("run-e", "shard", shards.fingerprint).exists("parts/00000-train.tokens")


def test_ingest_chunks_on_other_machines_share_their_parts_through_s3(
    s3, tmp_path, monkeypatch, config_file, reference
):
    on_machine(monkeypatch, tmp_path, "a")
    overrides = [f"workspace=s3://{BUCKET}/run-f", "ingest.chunk_bytes=10000", "ingest.dedup_buckets=3"]
    config = load_config(config_file, overrides)

    def on_a_worker_elsewhere(chunks):
        """The chunks on a machine with its own cache: what they write is in the bucket."""
        with pytest.MonkeyPatch.context() as worker:
            worker.setenv("GPTFLOW_CACHE", str(tmp_path / "cache-worker"))
            results = [ingest_chunk(chunk) for chunk in chunks]
        parts = RemoteStore(str(chunks[0].parts))
        assert len(chunks) > 2 and all(parts.exists(f"{chunk.index:05d}.arrow") for chunk in chunks)
        assert all(parts.exists(f"{chunk.index:05d}.keys") for chunk in chunks)
        return results

    corpus = run_ingest(config.ingest, config.workspace, on_a_worker_elsewhere, parts_in_workspace=True)
    assert file_digests(corpus.path) == file_digests(reference.corpus.path)  # corpus and manifest
    assert not remote_stage("run-f", "ingest", corpus.fingerprint).exists("parts/00000.arrow")


def test_a_workspace_uri_without_a_bucket_is_refused_naming_the_field(config_file):
    with pytest.raises(UserError, match=r"field 'workspace': .*'s3:///runs' names no bucket"):
        load_config(config_file, ["workspace=s3:///runs"])
    assert load_config(config_file, ["workspace=s3://bucket/runs/"]).workspace == "s3://bucket/runs/"


# --- training checkpoints, and status / clean / --dry-run, on an s3:// workspace -------------

TRAINING = ["pretrain.max_steps=12", "pretrain.checkpoint_every=3", "pretrain.keep_checkpoints=2", "finetune=null"]


@pytest.fixture(scope="module")
def training_config(tmp_path_factory) -> Path:
    """The micro pipeline config: the data, a model and its training."""
    return write_pipeline_config(tmp_path_factory.mktemp("s3-training"), name="s3-training")


class Crash(Exception):
    pass


def pretrain_on(training_config: Path, workspace: str | Path, crash_at: int | None = None) -> tuple[list[int], Path]:
    """Prepare (or reuse) the data and pretrain in `workspace`; with `crash_at`, the process
    "dies" (an exception out of training) when that step's metrics arrive. Returns the steps
    taken and the final weights."""
    config = load_config(training_config, [f"workspace={workspace}", *TRAINING])
    data = prepare_data_locally(config)
    steps = []

    def on_step(step, metrics):
        if step == crash_at:
            raise Crash
        steps.append(step)

    output = run_pretrain(config.pretrain, config.model, data.shards, config.workspace, callback=on_step)
    return steps, output.checkpoint / "model.safetensors"


def test_training_resumes_on_another_machine_from_checkpoints_in_the_bucket(s3, tmp_path, monkeypatch, training_config):
    _, expected = pretrain_on(training_config, tmp_path / "local")  # uninterrupted, local
    workspace = f"s3://{BUCKET}/run-f"
    on_machine(monkeypatch, tmp_path, "a")
    with pytest.raises(Crash):
        pretrain_on(training_config, workspace, crash_at=8)

    on_machine(monkeypatch, tmp_path, "b")  # nothing of machine a's files here
    (stage,) = [s for s in load_plan(training_config, workspace) if s.stage == "pretrain"]
    assert stage.action == "resume"  # seen in the bucket
    checkpoints = remote_stage("run-f", "pretrain", stage.fingerprint)
    assert checkpoints.exists("checkpoints/step-6.complete") and checkpoints.exists("checkpoints/step-6/state.pt")
    assert not checkpoints.exists(MANIFEST)
    steps, weights = pretrain_on(training_config, workspace)
    assert steps == list(range(7, 13))  # from machine a's newest checkpoint, step 6
    assert weights.read_bytes() == expected.read_bytes()  # bitwise the uninterrupted run
    assert not checkpoints.exists("checkpoints/step-6.complete")  # pruned like the local ones (keep 2)


def load_plan(training_config: Path, workspace: str | Path):
    return plan(load_config(training_config, [f"workspace={workspace}", *TRAINING]))


def test_dry_run_status_and_clean_read_the_bucket(s3, tmp_path, monkeypatch, training_config):
    pretrain_on(training_config, tmp_path / "local")
    on_machine(monkeypatch, tmp_path, "a")
    workspace = f"s3://{BUCKET}/run-g"
    pretrain_on(training_config, workspace)
    cache = on_machine(monkeypatch, tmp_path, "b")

    # The plan from the bucket's manifests matches the one from hashing the local files.
    remote_plan, local_plan = load_plan(training_config, workspace), load_plan(training_config, tmp_path / "local")
    assert [(s.label, s.fingerprint, s.action) for s in remote_plan] == [
        (s.label, s.fingerprint, s.action) for s in local_plan
    ]
    assert [s.action for s in remote_plan][:5] == ["skip"] * 4 + ["run"]  # evaluate-pretrained: its fingerprint known
    assert remote_plan[4].fingerprint is not None
    assert not list(cache.rglob("*.safetensors"))  # nothing but manifests and a config was read

    half_built = remote_stage("run-g", "pretrain", "0123456789abcdef")
    half_built.put_empty("checkpoints/step-3/model.safetensors")
    status = CliRunner().invoke(app, ["status", workspace])
    assert status.exit_code == 0, status.output
    lines = [line.split() for line in status.output.splitlines()]
    assert ["pretrain", "0123456789abcdef", "0", "B", "incomplete"] in lines
    assert sum(line[-1] == "complete" for line in lines) == 4

    recent = CliRunner().invoke(app, ["clean", workspace])  # just written: maybe another machine's build
    assert "0 stage output(s)" in recent.output
    monkeypatch.setattr("flows.housekeeping.REMOTE_IDLE_SECONDS", 0)
    keep = tmp_path / "keep.yaml"  # the config as run: the bucket's workspace, the training overrides
    keep.write_text(
        yaml.safe_dump(load_config(training_config, [f"workspace={workspace}", *TRAINING]).model_dump(mode="json"))
    )
    cleaned = CliRunner().invoke(app, ["clean", workspace, "--keep", str(keep)])
    assert cleaned.exit_code == 0, cleaned.output
    assert f"removing {workspace}/pretrain/0123456789abcdef (incomplete" in cleaned.output
    assert not half_built.files()
    assert [s.action for s in load_plan(training_config, workspace)][:4] == ["skip"] * 4  # what the config uses stays


def test_the_whole_pipeline_commits_every_stage_to_the_bucket(
    s3, prefect_server, tmp_path, monkeypatch, training_config
):
    from flows.pipeline import pipeline

    workspace = f"s3://{BUCKET}/run-h"
    on_machine(monkeypatch, tmp_path, "a")
    result = pipeline(load_config(training_config, [f"workspace={workspace}"]))
    assert result.registered.version

    on_machine(monkeypatch, tmp_path, "b")  # a machine that never ran it sees every stage done
    planned = plan(load_config(training_config, [f"workspace={workspace}"]))
    assert [(step.label, step.action) for step in planned] == [
        ("ingest", "skip"),
        ("train-tokenizer", "skip"),
        ("shard", "skip"),
        ("pretrain", "skip"),
        ("evaluate-pretrained", "skip"),
        ("finetune", "skip"),
        ("evaluate-finetuned", "skip"),
        ("register-model", "run"),
    ]
