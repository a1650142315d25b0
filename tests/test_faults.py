"""Faults injected into real processes: SIGKILL, dead servers, races.

Every kill here is a real SIGKILL to a real process (no cleanup code runs in it), at a
random moment drawn from a seeded generator (the seed is printed so a failure can be
replayed). Each test compares what the rerun leaves with what an uninterrupted run
leaves: byte for byte for the shards, bit for bit for the weights.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from mlflow.tracking import MlflowClient

from flows.config import load_config
from flows.prepare import prepare_data_locally
from model.checkpoint import latest_checkpoint
from pipeline_micro import write_config
from tasks.pretrain import run_pretrain

REPO = Path(__file__).resolve().parents[1]
GPTFLOW = str(Path(sys.executable).with_name("gptflow"))
SEED = 20261122
SHARD_TRIALS = 10
PRETRAIN_TRIALS = 5


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def temporary_files(root: Path) -> list[Path]:
    """What `atomic_path` and `save_checkpoint` write before renaming into place."""
    return [path for path in root.rglob("*") if ".tmp-" in path.name]


def start(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)  # fmt: skip


def wait_for_line(process: subprocess.Popen, prefix: str) -> str:
    """Read the child's output up to the first line starting with `prefix`."""
    seen = []
    for line in process.stdout:
        if line.startswith(prefix):
            return line
        seen.append(line)
    raise AssertionError(f"the child exited ({process.wait()}) before printing {prefix!r}:\n{''.join(seen)[-3000:]}")


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


# --- SIGKILL during the shard stage ---------------------------------------------------------

SHARD_CHILD = """
import sys
from flows.config import load_config
from tasks.bpe import run_bpe
from tasks.ingest import run_ingest
from tasks.shard import run_shard

config = load_config(sys.argv[1], [f"workspace={sys.argv[2]}"])
corpus = run_ingest(config.ingest, config.workspace)
tokenizer = run_bpe(config.bpe, corpus, config.workspace)
print("sharding", flush=True)
run_shard(config.shard, corpus, tokenizer, config.workspace)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def shard_config(tmp_path_factory) -> Path:
    """About 300 KB of standard-library source and 4 KiB shard files: over a hundred files,
    so random kills land while files are being written."""
    root = tmp_path_factory.mktemp("shard-faults")
    corpus, size = root / "corpus", 0
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if size > 300_000:
            break
        shutil.copy(path, corpus / path.name)
        size += path.stat().st_size
    config = {
        "name": "shard-faults",
        "ingest": {"source": str(corpus), "val_fraction": 0.3},
        "bpe": {"vocab_size": 320},
        "shard": {"seq_len": 32, "shard_bytes": 4096},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_sigkill_during_the_shard_stage_loses_nothing(shard_config, tmp_path):
    rng = random.Random(SEED)
    # The uninterrupted run, in a child like the killed ones, timed from the stage's start.
    reference = tmp_path / "reference"
    child = start(SHARD_CHILD, str(shard_config), str(reference))
    wait_for_line(child, "sharding")
    started = time.monotonic()
    wait_for_line(child, "done")
    shard_seconds = time.monotonic() - started
    assert child.wait() == 0
    (expected_dir,) = [path for path in (reference / "shard").iterdir() if path.is_dir()]
    expected = digests(expected_dir)
    assert sum(name.endswith(".parquet") for name in expected) >= 50 and "manifest.json" in expected

    # Every trial starts from the committed ingest and bpe stages, so the kill hits sharding.
    base = tmp_path / "base"
    for stage in ("ingest", "bpe"):
        shutil.copytree(reference / stage, base / stage)
    interrupted = with_temporary_files = 0
    for trial in range(SHARD_TRIALS):
        workspace = tmp_path / f"trial-{trial}"
        shutil.copytree(base, workspace)
        child = start(SHARD_CHILD, str(shard_config), str(workspace))
        wait_for_line(child, "sharding")
        time.sleep(rng.uniform(0, shard_seconds))
        sigkill(child)
        stage_dir = workspace / "shard" / expected_dir.name
        interrupted += not (stage_dir / "manifest.json").exists()
        with_temporary_files += bool(temporary_files(workspace))

        prepared = prepare_data_locally(load_config(shard_config, [f"workspace={workspace}"]))

        assert prepared.shards.path == stage_dir
        assert digests(stage_dir) == expected, f"trial {trial} (seed {SEED})"
        assert not temporary_files(workspace), f"trial {trial} (seed {SEED})"
    # The kills must mostly land inside the stage, or the test proves little.
    assert interrupted >= SHARD_TRIALS * 0.6, (interrupted, shard_seconds)
    print(f"shard stage {shard_seconds:.2f} s, {len(expected) - 1} files; {SHARD_TRIALS} kills, {interrupted} before the manifest, {with_temporary_files} with temporary files left")
