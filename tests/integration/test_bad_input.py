"""The catalogue of bad input: every case goes through the real `gptflow` entry point
(`cli.app.main`, in this process, on the session's Prefect server) and must end with exit
code 2, exactly one line `error: ...` naming the problem, and no traceback anywhere in
what the user sees (Prefect's own log lines included).

File names a file system holds but a pipeline finds hard (not UTF-8, newlines, control
characters, 255 bytes, deep paths, case and normalisation twins) are kept and counted: the
last test runs such a corpus through `gptflow pretrain`, `gptflow status`, the MLflow records
and the Prefect artifacts. Only an unreadable file under `ingest.on_unreadable=fail` stops a
run, as the cases here show, its name escaped on the one line.

A case is (id, how to build its command line, the fragment its error line must contain).
Builders get a `Fixtures` object with a base config and a few prepared files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import pyarrow as pa
import pytest
import yaml
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from cli.app import main
from flows.pipeline_config import load_config
from flows.prepare import prepare_data_locally
from support.bad_files import (
    BEYOND_PATH_MAX,
    BINARY,
    HOSTILE_NAMES,
    TEXT,
    UNREADABLE_FILES,
    module_text,
    name_of,
    parquet_bytes,
    write_at,
)
from support.configs import write_pipeline_config
from support.models import save_base_checkpoint, tiny_gpt
from tasks.ingest import read_corpus
from tasks.tracking.stage_run import artifact_key


@dataclass(frozen=True)
class Fixtures:
    root: Path  # a fresh directory for this case's own files
    config: Path  # the micro pipeline config (its corpus is prepared in `workspace`)
    workspace: Path  # prepared: every data stage committed
    checkpoint: Path  # a tiny model checkpoint to fine-tune from

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return path

    def config_with(self, text: str) -> Path:
        return self.write("config.yaml", text)

    def prepare(self, *overrides: str) -> list[str]:
        """`gptflow prepare` on the micro config in this case's own workspace."""
        return [
            "prepare",
            str(self.config),
            "--set",
            f"workspace={self.root / 'workspace'}",
            *(arg for override in overrides for arg in ("--set", override)),
        ]

    def corpus(self, files: dict[str | bytes, bytes | str], *overrides: str) -> list[str]:
        """`gptflow prepare` over a corpus directory holding `files` (names as text or as bytes)."""
        for name, data in files.items():
            write_at(self.root / "corpus", os.fsencode(name), data if isinstance(data, bytes) else data.encode())
        return self.prepare(f"ingest.source={self.root / 'corpus'}", "ingest.min_chars=1", *overrides)

    def finetune_file(self, name: str, data: str | None) -> list[str]:
        """`gptflow finetune --from CHECKPOINT` with `finetune.path` a file of that content
        (None: the file does not exist); the data stages are the prepared ones."""
        path = self.write(name, data) if data is not None else self.root / name
        return [
            "finetune",
            str(self.config),
            "--from",
            str(self.checkpoint),
            "--set",
            f"workspace={self.workspace}",
            "--set",
            "finetune.task=null",
            "--set",
            f"finetune.path={path}",
        ]

    def corrupt_checkpoint(self) -> Path:
        """A copy of the tiny checkpoint whose weights file is not safetensors."""
        copy = shutil.copytree(self.checkpoint, self.root / "corrupt")
        (copy / "model.safetensors").write_bytes(b"not safetensors" * 8)
        return copy

    def tampered_shards(self, tamper: Callable[[Path, dict], dict | None]) -> list[str]:
        """`gptflow prepare` on a copy of the prepared workspace whose shard directory
        `tamper(directory, manifest)` changed; the manifest it returns is written back."""
        copy = self.root / "workspace"
        shutil.copytree(self.workspace, copy)
        (manifest_path,) = (copy / "shard").glob("*/manifest.json")
        if (manifest := tamper(manifest_path.parent, json.loads(manifest_path.read_text()))) is not None:
            manifest_path.write_text(json.dumps(manifest))
        return ["prepare", str(self.config), "--set", f"workspace={copy}"]


def flip_a_byte(directory: Path, manifest: dict) -> dict:
    shard = directory / manifest["files"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return manifest


def rename_first_file(new_path: str) -> Callable[[Path, dict], dict]:
    def tamper(directory: Path, manifest: dict) -> dict:
        manifest["files"][0]["path"] = new_path
        return manifest

    return tamper


def delete_first_file(directory: Path, manifest: dict) -> dict:
    (directory / manifest["files"][0]["path"]).unlink()
    return manifest


def garble_manifest(directory: Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text('{"format": 1, "files": [')


def yaml_config(**sections) -> str:
    return yaml.safe_dump({"name": "bad", **sections})


CASES: list[tuple[str, Callable[[Fixtures], list[str]], str]] = [
    # --- corpus files -------------------------------------------------------------------
    (
        "corpus-missing-path",
        lambda f: f.prepare(f"ingest.source={f.root / 'nowhere'}"),
        "nowhere: no such file or directory",
    ),
    ("corpus-empty-glob", lambda f: f.prepare(f"ingest.source={f.root}/*.txt"), "matches no files"),
    (
        "corpus-unsupported-file",
        lambda f: f.prepare(f"ingest.source={f.write('data.csv', 'a,b')}"),
        "unsupported file type",
    ),
    (
        "corpus-no-supported-files",
        lambda f: f.corpus({"a.csv": "a,b", "b.bin": BINARY}),
        "has 2 files but none of type",
    ),
    ("corpus-binary-only", lambda f: f.corpus({"a.txt": BINARY, "b.py": BINARY}), "files_binary_skipped=2"),
    (
        "corpus-empty-after-filtering",
        lambda f: f.corpus({"a.txt": "short", "b.txt": "tiny"}, "ingest.min_chars=1000"),
        "no usable document (files_read=2, documents_in=2, dropped_short=2",
    ),
    (
        "corpus-jsonl-without-text-field",
        lambda f: f.corpus({"a.jsonl": '{"body": "x"}\n{"body": "y"}\n'}),
        "ingest.text_field 'text' is missing in records or files",
    ),
    (
        "corpus-jsonl-malformed-lines",
        lambda f: f.corpus({"a.jsonl": '{"text": "unterminated\n[1, 2\n'}),
        "records_without_text=2",
    ),
    (
        "corpus-parquet-without-text-column",
        lambda f: f.corpus({"a.parquet": parquet_bytes(pa.table({"body": ["x"]}))}),
        "files_without_text_field=1",
    ),
    # Unreadable files: skipped by default (here every file is, so nothing is left), one line naming the file with fail.
    ("corpus-only-unreadable-files", lambda f: f.corpus(UNREADABLE_FILES), "files_unreadable=5"),
    *[
        (
            f"corpus-unreadable-{name.replace('.', '-')}-fail",
            lambda f, name=name: f.corpus(
                {name: UNREADABLE_FILES[name], "good.txt": TEXT}, "ingest.on_unreadable=fail"
            ),
            f"{name}: unreadable",
        )
        for name in UNREADABLE_FILES
    ],
    # Hostile file names: an unreadable file is skipped and counted like any other (so a corpus
    # of nothing else is empty), and with fail the one line names it, escaped.
    (
        "corpus-hostile-names-only-unreadable-files",
        lambda f: f.corpus({b"\xff\xfe.txt.gz": UNREADABLE_FILES["cut.txt.gz"], b"new\nline.parquet": b"no"}),
        "files_unreadable=2",
    ),
    (
        "corpus-name-not-utf8-unreadable-fail",
        lambda f: f.corpus(
            {b"\xff\xfe.txt.gz": UNREADABLE_FILES["cut.txt.gz"], "good.txt": TEXT}, "ingest.on_unreadable=fail"
        ),
        "\\xff\\xfe.txt.gz: unreadable: ",
    ),
    (
        "corpus-name-with-newline-unreadable-fail",
        lambda f: f.corpus(
            {b"cut\nshort.jsonl.zst": UNREADABLE_FILES["cut.jsonl.zst"], "good.txt": TEXT}, "ingest.on_unreadable=fail"
        ),
        "cut\\nshort.jsonl.zst: unreadable: ",
    ),
    (
        "corpus-path-beyond-path-max-fail",
        lambda f: f.corpus({BEYOND_PATH_MAX: TEXT, "good.txt": TEXT}, "ingest.on_unreadable=fail"),
        "pppp: unreadable: [Errno 36] File name too long",
    ),
    (
        "corpus-val-split-empty",
        lambda f: f.corpus({"a.txt": TEXT}, "ingest.val_fraction=0.001"),
        "the val split is empty",
    ),
    (
        "corpus-seq-len-too-large-for-a-split",
        lambda f: f.prepare("shard.seq_len=100000", "model.block_size=100000", "shard.shard_bytes=10000000"),
        "tokens, fewer than shard.seq_len + 1 = 100001",
    ),
    (
        "shard-bytes-too-small-for-a-window",
        lambda f: f.prepare("shard.seq_len=4000", "model.block_size=4000", "shard.shard_bytes=4096"),
        "too small for one window",
    ),
    # --- fine-tuning files ----------------------------------------------------------------
    (
        "finetune-file-missing",
        lambda f: f.finetune_file("pairs.jsonl", None),
        "pairs.jsonl: fine-tuning file not found",
    ),
    ("finetune-file-empty", lambda f: f.finetune_file("pairs.jsonl", ""), "no prompt/completion pairs in the file"),
    (
        "finetune-malformed-line",
        lambda f: f.finetune_file("pairs.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
        "pairs.jsonl:2: not valid JSON",
    ),
    (
        "finetune-line-not-an-object",
        lambda f: f.finetune_file("pairs.jsonl", '["a", "b"]\n'),
        "pairs.jsonl:1: expected a JSON object",
    ),
    (
        "finetune-missing-field",
        lambda f: f.finetune_file("pairs.jsonl", '{"prompt": "a"}\n'),
        "pairs.jsonl:1: field 'completion' is missing",
    ),
    (
        "finetune-wrong-suffix",
        lambda f: f.finetune_file("pairs.csv", "prompt,completion\n"),
        "must be .jsonl or .parquet",
    ),
    # --- YAML configs ----------------------------------------------------------------------
    (
        "yaml-missing-file",
        lambda f: ["run", str(f.root / "absent.yaml"), "--dry-run"],
        "absent.yaml: config file not found",
    ),
    (
        "yaml-syntax",
        lambda f: ["run", str(f.config_with("name: [unclosed\n")), "--dry-run"],
        "not a readable YAML file",
    ),
    (
        "yaml-not-a-mapping",
        lambda f: ["run", str(f.config_with("- name\n- bad\n")), "--dry-run"],
        "expected a mapping of sections",
    ),
    (
        "yaml-missing-name",
        lambda f: ["run", str(f.config_with("workspace: ./w\n")), "--dry-run"],
        "field 'name': Field required",
    ),
    (
        "yaml-unknown-field",
        lambda f: ["run", str(f.config_with(yaml_config(pretrain={"learning_rate": 0.1}))), "--dry-run"],
        "field 'pretrain.learning_rate': Extra inputs are not permitted",
    ),
    (
        "yaml-unknown-section",
        lambda f: ["run", str(f.config_with(yaml_config(trainer={}))), "--dry-run"],
        "field 'trainer'",
    ),
    (
        "yaml-wrong-type",
        lambda f: ["run", str(f.config_with(yaml_config(pretrain={"max_steps": "many"}))), "--dry-run"],
        "field 'pretrain.max_steps': Input should be a valid integer",
    ),
    (
        "yaml-heads-do-not-divide-width",
        lambda f: [
            "run",
            str(
                f.config_with(
                    yaml_config(model={"preset": None, "n_layer": 1, "block_size": 16, "n_embd": 30, "n_head": 4})
                )
            ),
            "--dry-run",
        ],
        "n_embd (30) must be divisible by n_head (4)",
    ),
    (
        "yaml-vocab-too-small",
        lambda f: ["run", str(f.config_with(yaml_config(bpe={"vocab_size": 100}))), "--dry-run"],
        "field 'bpe.vocab_size'",
    ),
    (
        "yaml-stride-beyond-seq-len",
        lambda f: ["run", str(f.config_with(yaml_config(shard={"seq_len": 32, "stride": 64}))), "--dry-run"],
        "stride (64) must be at most seq_len (32)",
    ),
    (
        "yaml-val-fraction-out-of-range",
        lambda f: ["run", str(f.config_with(yaml_config(ingest={"val_fraction": 1.5}))), "--dry-run"],
        "field 'ingest.val_fraction'",
    ),
    (
        "yaml-unknown-preset",
        lambda f: ["run", str(f.config_with(yaml_config(model={"preset": "gpt-9"}))), "--dry-run"],
        "unknown preset 'gpt-9'",
    ),
    (
        "yaml-windows-longer-than-the-context",
        lambda f: [
            "run",
            str(f.config_with(yaml_config(shard={"seq_len": 64}, model={"block_size": 32}))),
            "--dry-run",
        ],
        "shard.seq_len (64) exceeds the model's context (model.block_size 32)",
    ),
    (
        "yaml-unknown-gate-metric",
        lambda f: ["run", str(f.config_with(yaml_config(register={"gate_metric": "val_bpb"}))), "--dry-run"],
        "field 'register.gate_metric': Value error, 'val_bpb' is not a figure a gate can compare",
    ),
    # --- command-line values -------------------------------------------------------------------
    (
        "cli-set-without-equals",
        lambda f: ["run", str(f.config), "--set", "pretrain.max_steps", "--dry-run"],
        "--set 'pretrain.max_steps': expected dotted.key=value",
    ),
    ("cli-set-empty-key", lambda f: ["run", str(f.config), "--set", "=3", "--dry-run"], "expected dotted.key=value"),
    (
        "cli-set-unparsable-value",
        lambda f: ["run", str(f.config), "--set", "prompts=[unclosed", "--dry-run"],
        "--set 'prompts=[unclosed': the value is not valid YAML",
    ),
    (
        "cli-set-on-a-non-section",
        lambda f: ["run", str(f.config), "--set", "name.first=x", "--dry-run"],
        "name is not a section",
    ),
    (
        "cli-set-invalid-value",
        lambda f: ["run", str(f.config), "--set", "pretrain.lr=-1", "--dry-run"],
        "field 'pretrain.lr'",
    ),
    ("cli-serve-without-schedule", lambda f: ["serve", str(f.config)], "give exactly one of --cron and --interval"),
    # --- devices and batch shapes, checked when a run starts (this machine has no GPU) ---------
    (
        "device-unknown-spelling",
        lambda f: ["run", str(f.config_with(yaml_config(device="gpu"))), "--dry-run"],
        "field 'device': Value error, 'gpu' is not a device; use auto, cpu, cuda or cuda:N",
    ),
    (
        "device-cuda-absent",
        lambda f: ["run", str(f.config), "--set", "device=cuda"],
        "device: cuda needs a CUDA device; this machine has no CUDA device",
    ),
    (
        "device-cuda-index-absent",
        lambda f: ["run", str(f.config), "--set", "device=cuda:3"],
        "device: cuda:3 is not a device here; this machine has no CUDA device",
    ),
    (
        "device-pretrain-cuda-absent",
        lambda f: ["pretrain", str(f.config), "--set", "pretrain.device=cuda:3"],
        "pretrain.device: cuda:3 is not a device here",
    ),
    (
        "device-micro-batch-does-not-divide",
        lambda f: ["run", str(f.config), "--set", "pretrain.micro_batch_size=3"],
        "pretrain.batch_tokens (256) must be a multiple of pretrain.micro_batch_size x seq_len x processes"
        " = 3 x 32 x 1",
    ),
    (
        "device-finetune-micro-batch-does-not-divide",
        lambda f: ["run", str(f.config), "--set", "finetune.micro_batch_size=3"],
        "finetune.batch_tokens (128) must be a multiple of finetune.micro_batch_size x seq_len x processes"
        " = 3 x 32 x 1",
    ),
    (
        "device-generate-cuda-absent",
        lambda f: ["generate", "models:/any@champion", "-p", "x", "--device", "cuda"],
        "--device: cuda needs a CUDA device; this machine has no CUDA device",
    ),
    # --- model URIs and checkpoints ------------------------------------------------------------
    (
        "model-unknown-registered-model",
        lambda f: ["generate", f"models:/no-such-model-{uuid.uuid4().hex[:6]}@champion", "-p", "x"],
        "Registered Model with name=no-such-model",
    ),
    ("model-malformed-uri", lambda f: ["generate", "models:/", "-p", "x"], "Not a proper models:/ URI"),
    (
        "model-missing-checkpoint-dir",
        lambda f: ["evaluate", str(f.config), str(f.root / "no-checkpoint")],
        "no-checkpoint: not a checkpoint directory",
    ),
    (
        "model-corrupt-weights",
        lambda f: ["evaluate", str(f.config), str(f.corrupt_checkpoint())],
        "model.safetensors: not a readable safetensors file",
    ),
    (
        "model-finetune-from-missing-dir",
        lambda f: ["finetune", str(f.config), "--from", str(f.root / "gone")],
        "gone: not a checkpoint directory",
    ),
    # --- manifests ------------------------------------------------------------------------------
    ("manifest-tampered-shard", lambda f: f.tampered_shards(flip_a_byte), "contents no longer match the sha256"),
    (
        "manifest-path-escapes",
        lambda f: f.tampered_shards(rename_first_file("../../bpe/x.parquet")),
        "leaves the stage directory",
    ),
    (
        "manifest-absolute-path",
        lambda f: f.tampered_shards(rename_first_file("/etc/passwd")),
        "'/etc/passwd' leaves the stage directory",
    ),
    ("manifest-missing-file", lambda f: f.tampered_shards(delete_first_file), "but missing"),
    ("manifest-unreadable-json", lambda f: f.tampered_shards(garble_manifest), "unreadable manifest"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, prefect_server) -> tuple[Path, Path, Path]:
    """The micro config, its prepared workspace and a tiny checkpoint, built once."""
    root = tmp_path_factory.mktemp("bad-input")
    config = write_pipeline_config(root, name=f"bad-input-{uuid.uuid4().hex[:6]}")
    prepare_data_locally(load_config(config))
    checkpoint = save_base_checkpoint(tiny_gpt(vocab_size=320, block_size=32), root / "base")
    return config, load_config(config).workspace, checkpoint


def gptflow(args: list[str], capfd) -> tuple[int, str]:
    """Run the console entry point in this process; (exit code, everything it printed)."""
    with patch.object(sys, "argv", ["gptflow", *args]), pytest.raises(SystemExit) as exited:
        main()
    out, err = capfd.readouterr()
    return exited.value.code, out + err


def test_the_catalogue_is_large_and_covers_every_kind_of_input():
    kinds = {case_id.split("-")[0] for case_id, _, _ in CASES}
    assert len(CASES) >= 25
    assert kinds == {"corpus", "shard", "finetune", "yaml", "cli", "device", "model", "manifest"}


@pytest.mark.parametrize(("build", "fragment"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_ends_in_one_clear_line(build, fragment, prepared, tmp_path, capfd):
    config, workspace, checkpoint = prepared
    args = build(Fixtures(tmp_path, config, workspace, checkpoint))
    capfd.readouterr()  # what building the case printed is not the command's output

    code, output = gptflow(args, capfd)

    error_lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert code == 2, output[-3000:]
    assert len(error_lines) == 1, output[-3000:]
    assert fragment in error_lines[0]
    assert "Traceback" not in output


def test_a_corpus_of_hostile_file_names_goes_through_the_pipeline(prefect_server, tmp_path, capfd):
    name = f"hostile-names-{uuid.uuid4().hex[:6]}"
    config = write_pipeline_config(tmp_path, name=name)  # generated modules in tmp_path/corpus
    for index, hostile in enumerate(HOSTILE_NAMES.values()):
        write_at(tmp_path / "corpus", hostile, module_text(index).encode())
    write_at(tmp_path / "corpus", b"\xff cut.txt.gz", UNREADABLE_FILES["cut.txt.gz"])
    overrides = ["--set", "ingest.filters.near_dedup=false", "--set", "pretrain.max_steps=2"]

    code, output = gptflow(["pretrain", str(config), *overrides], capfd)
    assert code == 0 and "Traceback" not in output, output[-3000:]

    # The corpus: every hostile file a document whose id names it; the unreadable one listed.
    (ingest,) = (tmp_path / "workspace" / "ingest").glob("*/manifest.json")
    report = json.loads(ingest.read_text())["report"]
    assert report["files_unreadable"] == 1 and report["unreadable"][0]["file"] == "\\xff cut.txt.gz"
    ids = {doc_id for batch in read_corpus(ingest.parent / "corpus.parquet") for doc_id in batch.column("id")}
    assert set(HOSTILE_NAMES.values()) <= {name_of(str(doc_id)) for doc_id in ids}

    code, output = gptflow(["prepare", str(config), *overrides], capfd)  # a rerun reuses every stage
    assert code == 0 and "ingest  reused" in output, output[-3000:]
    code, output = gptflow(["status", str(tmp_path / "workspace")], capfd)
    assert code == 0 and re.search(r"^ingest .* complete$", output, re.MULTILINE), output

    # MLflow: the ingest run's manifest and the corpus dataset, the escaped name in the report.
    client = MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if e.name == name]
    (ingest_run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'ingest'")
    assert [d.dataset.name for d in ingest_run.inputs.dataset_inputs] == ["corpus"]
    manifest = client.download_artifacts(ingest_run.info.run_id, "ingest/manifest.json", str(tmp_path))
    assert json.loads(Path(manifest).read_text())["report"]["unreadable"] == report["unreadable"]

    # Prefect: the data report's table artifact (one from each run) lists it too.
    with get_client(sync_client=True) as prefect:
        tables = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(name, "data-report")]))
        )
    assert len(tables) == 2
    for table in tables:
        rows = json.loads(table.data) if isinstance(table.data, str) else table.data
        assert [row["value"] for row in rows if row["field"] == "unreadable"] == [report["unreadable"]]
