"""The prepare-data flow: determinism, reuse, invalidation, concurrency, artifact, CLI."""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from flows.pipeline_config import load_config
from flows.prepare import PreparedData, prepare_data, prepare_data_locally
from support.configs import write_data_config
from support.processes import GPTFLOW
from tasks.core.progress import size_text
from tasks.tracking.stage_run import artifact_key


@pytest.fixture(scope="module")
def data_config_file(tmp_path_factory) -> Path:
    """A config file for a micro corpus of a few stdlib modules, vocab 300, seq_len 32."""
    return write_data_config(tmp_path_factory.mktemp("prepare"))


def prepare(data_config_file: Path, workspace: Path, *overrides: str) -> PreparedData:
    return prepare_data_locally(load_config(data_config_file, [f"workspace={workspace}", *overrides]))


def stage_files(prepared: PreparedData) -> dict[str, bytes]:
    """Every file of every stage directory, by path relative to the workspace."""
    workspace = prepared.corpus.path.parents[1]
    return {
        str(path.relative_to(workspace)): path.read_bytes()
        for output in prepared.stages().values()
        for path in sorted(output.path.iterdir())
    }


def test_two_workspaces_get_byte_identical_stages(tmp_path, data_config_file):
    first = stage_files(prepare(data_config_file, tmp_path / "a"))
    second = stage_files(prepare(data_config_file, tmp_path / "b"))
    assert any(name.startswith("shard/") and name.endswith("train-00001.parquet") for name in first)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)


def test_a_rerun_verifies_and_reuses_every_stage_without_tokenizing(tmp_path, data_config_file, monkeypatch):
    built = prepare(data_config_file, tmp_path)
    assert not any(output.reused for output in built.stages().values())
    for work in ("tasks.ingest.write_corpus", "tasks.bpe.train", "tasks.shard.load_tokenizer"):
        monkeypatch.setattr(work, lambda *args, **kwargs: pytest.fail("a reused stage did work"))
    reused = prepare(data_config_file, tmp_path)
    assert all(output.reused for output in reused.stages().values())
    # Everything but `reused`, also on the tokenizer output the shards carry.
    same = {"corpus": {"reused"}, "tokenizer": {"reused"}, "shards": {"reused": True, "tokenizer": {"reused"}}}
    assert reused.model_dump(exclude=same) == built.model_dump(exclude=same)


@pytest.mark.parametrize(
    ("override", "redone"),
    [
        ("shard.seq_len=16", {"shard"}),
        ("bpe.vocab_size=280", {"bpe", "shard"}),
        ("ingest.min_chars=10", {"ingest", "bpe", "shard"}),
    ],
)
def test_a_changed_setting_redoes_its_stage_and_the_later_ones_only(tmp_path, data_config_file, override, redone):
    before = prepare(data_config_file, tmp_path)
    after = prepare(data_config_file, tmp_path, override)
    assert {stage for stage, output in after.stages().items() if not output.reused} == redone
    for stage, output in after.stages().items():
        assert (output.path == before.stages()[stage].path) == (stage not in redone)
        assert before.stages()[stage].path.is_dir()  # nothing is overwritten or removed


def test_two_runs_at_once_on_one_workspace_build_each_stage_once(tmp_path, data_config_file):
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: prepare(data_config_file, tmp_path), range(2)))
    for stage in ("ingest", "bpe", "shard"):
        assert sorted(run.stages()[stage].reused for run in runs) == [False, True]
    assert stage_files(runs[0]) == stage_files(runs[1])
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_the_flow_publishes_the_three_reports(tmp_path, data_config_file, prefect_server):
    from prefect.artifacts import Artifact

    config = load_config(data_config_file, [f"workspace={tmp_path}"])
    state = prepare_data(config, return_state=True)
    prepared = state.result()
    assert isinstance(prepared, PreparedData)
    artifact = Artifact.get(artifact_key(config.name, "data-report"))
    assert artifact.flow_run_id == state.state_details.flow_run_id
    rows = json.loads(artifact.data)
    for stage, output in prepared.stages().items():
        published = {row["field"]: row["value"] for row in rows if row["stage"] == stage}
        assert published == {"fingerprint": output.fingerprint, "reused": output.reused, **output.report}
    assert {"documents_val", "val_bytes_per_token", "train_rows"} <= {row["field"] for row in rows}
    summary = Artifact.get(artifact_key(config.name, "data"))
    assert summary.flow_run_id == state.state_details.flow_run_id
    assert str(prepared.shards.manifest) in summary.data and "Not tracked in MLflow" in summary.data


def run_cli(cli_env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GPTFLOW, *args], env=cli_env, capture_output=True, text=True, timeout=300)


def test_cli_prepare_prints_each_stage_output(tmp_path, data_config_file, cli_env):
    result = run_cli(cli_env, "prepare", str(data_config_file), "--set", f"workspace={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = next((tmp_path / "shard").glob("*/manifest.json"))
    for output in (
        next((tmp_path / "ingest").glob("*/corpus.parquet")),
        next((tmp_path / "bpe").glob("*/tokenizer.json")),
        manifest,
    ):
        assert str(output) in result.stdout
    assert "built" in result.stdout and "train / " in result.stdout
    # Not a terminal: each data step ends with one plain progress line of its documents, bytes and tokens.
    corpus = json.loads(next((tmp_path / "ingest").glob("*/manifest.json")).read_text())["report"]
    shards = json.loads(manifest.read_text())["report"]
    documents, train = corpus["documents_out"], corpus["documents_train"]
    tokens = shards["train_stream_tokens"] + shards["val_stream_tokens"] - documents  # without one <|endoftext|> each
    assert f"ingest: chunk 0: {corpus['files_read']}/{corpus['files_read']} documents, " in result.stderr
    assert f"bpe: train tokenizer: {train}/{train} documents, {size_text(corpus['bytes_train'])}, " in result.stderr
    everything = size_text(corpus["bytes_train"] + corpus["bytes_val"])
    assert f"shard: chunk 0: {documents}/{documents} documents, {everything}, {tokens:,} tokens, " in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ingest.source=/no/such/corpus"], "error: ingest.source: /no/such/corpus: no such file or directory"),
        (
            ["ingest.val_fraction=0.001"],
            "error: ingest: the val split is empty (8 documents, ingest.val_fraction=0.001)",
        ),
    ],
    ids=["before-the-flow", "inside-the-flow"],
)
def test_cli_user_errors_end_in_one_line_and_exit_code_2(tmp_path, data_config_file, cli_env, overrides, message):
    settings = [arg for override in [f"workspace={tmp_path}", *overrides] for arg in ("--set", override)]
    result = run_cli(cli_env, "prepare", str(data_config_file), *settings)
    assert result.returncode == 2
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and message in last_line
    assert "Traceback" not in result.stdout
