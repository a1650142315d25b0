"""Ctrl-C (SIGINT) and SIGTERM (how Prefect cancels a flow run) stop `gptflow prepare` within
5 seconds while it trains the tokenizer (native code, in a child process) and while it encodes
the shards (on task-run threads); the stage stays uncommitted, no trainer process is left, and a
rerun succeeds with the same bytes as an uninterrupted run."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from support.digests import file_digests
from support.processes import GPTFLOW
from support.sigint import with_sigint

pytestmark = pytest.mark.slow

STOP_SECONDS = 5
STAGES = ["ingest", "bpe", "shard"]


def write_corpus(root: Path) -> Path:
    """~6 MB of pseudo-words in 300 files: a few seconds of tokenizer training and of encoding."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "pe", "qu", "sh", "th"]
    vocabulary = ["".join(rng.choices(syllables, k=rng.randint(1, 5))) for _ in range(30000)]
    source = root / "src"
    source.mkdir(parents=True)
    for index in range(300):
        lines = (" ".join(rng.choices(vocabulary, k=12)) for _ in range(330))
        (source / f"doc{index:03d}.txt").write_text("\n".join(lines) + "\n")
    config = root / "stop.yaml"
    config.write_text(
        f"name: stop\nworkspace: {root / 'workspace'}\n"
        f"ingest: {{source: {source}, val_fraction: 0.1, seed: 0}}\n"
        "bpe: {vocab_size: 4096, min_frequency: 2}\nshard: {seq_len: 128}\n"
    )
    return config


def prepare(config: Path, workspace: Path, cli_env: dict) -> subprocess.Popen:
    command = with_sigint([GPTFLOW, "prepare", str(config), "--set", f"workspace={workspace}"])
    return subprocess.Popen(command, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stage_digests(workspace: Path) -> dict[str, dict[str, str]]:
    return {stage.name: file_digests(next(stage.iterdir())) for stage in sorted(workspace.iterdir()) if stage.is_dir()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, prefect_server):
    import os

    root = tmp_path_factory.mktemp("stop")
    config = write_corpus(root)
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    process = prepare(config, root / "reference", env)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return config, root / "reference"


# Each signal and each stage once: both signals reach the same stop handler, so the other
# two pairings would repeat a minute of the suite without a new path.
@pytest.mark.parametrize(
    ("signum", "stage"), [(signal.SIGINT, "bpe"), (signal.SIGTERM, "shard")], ids=["SIGINT-bpe", "SIGTERM-shard"]
)
def test_a_signal_stops_the_stage_within_5_seconds_and_a_rerun_matches(uninterrupted, cli_env, tmp_path, stage, signum):
    config, reference_workspace = uninterrupted
    reference = stage_digests(reference_workspace)
    workspace = tmp_path / "workspace"
    for earlier in STAGES[: STAGES.index(stage)]:  # reused as they are: only `stage` and those after it run
        shutil.copytree(reference_workspace / earlier, workspace / earlier)
    process = prepare(config, workspace, cli_env)
    descendants: list[psutil.Process] = []
    while not list(workspace.glob(f"{stage}/*/")):  # the stage has started: its directory exists
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.05)
    time.sleep(1.0)  # well into the stage (the trainer's child process runs, the first batches encode)
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert not list(workspace.glob(f"{stage}/*/manifest.json")), "the stage ended before the signal: make it longer"
    process.send_signal(signum)
    sent, sent_at = time.monotonic(), time.strftime("%H:%M:%S") + f".{time.time() % 1:.3f}"[2:]
    output, _ = process.communicate(timeout=60)
    ended = time.monotonic() - sent
    assert ended < STOP_SECONDS, f"sent at {sent_at}, ended {ended:.1f} s later\n{output}"
    assert process.returncode != 0
    assert not list(workspace.glob(f"{stage}/*/manifest.json"))
    _, left = psutil.wait_procs(descendants, timeout=1)  # the trainer, if its parent died before killing it
    assert [child.cmdline()[:3] for child in left if child.status() != psutil.STATUS_ZOMBIE] == [], output
    rerun = prepare(config, workspace, cli_env)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, output
    assert stage_digests(workspace) == reference
