"""Fixtures for the loader, engine, checkpoint, DDP and pretrain tests: a micro GPT, a
resumable stream of random batches, and shards whose windows say which window they are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from model.config import GPTConfig
from model.train import RunSpec, TrainConfig
from tasks import shard

REPO = Path(__file__).resolve().parents[1]
MICRO = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
SEQ_LEN = 16


def micro_config(**overrides) -> TrainConfig:
    fields = dict(
        max_steps=4,
        batch_tokens=128,
        micro_batch_size=4,
        warmup_steps=1,
        eval_every=0,
        eval_batches=1,
        checkpoint_every=1,
        lr=1e-2,
        device="cpu",
    )
    return TrainConfig(**{**fields, **overrides})


class RandomBatches:
    """An endless, resumable stream of random windows: the `Batches` interface without files."""

    def __init__(self, batch_size: int = 4, seq_len: int = SEQ_LEN, vocab_size: int = 64, seed: int = 0):
        self.batch_size, self.seq_len, self.vocab_size, self.seed = batch_size, seq_len, vocab_size, seed
        self.start = self.position = 0

    def __iter__(self):
        index = self.start
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            windows = torch.randint(self.vocab_size, (self.batch_size, self.seq_len + 1), generator=generator)
            index += 1
            self.position = index
            yield windows[:, :-1], windows[:, 1:]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.start = self.position = state["position"]


def make_shards(
    directory: Path, windows: dict[str, int], vocab_size: int = 64, shard_bytes: int = 8192, seq_len: int = SEQ_LEN
) -> Path:
    """Shards of `windows[split]` windows each, written by the shard stage's writer.

    The stream is 0, 1, 2, ... (mod `vocab_size`), so with `vocab_size` larger than the
    stream, window i's first token is `i * seq_len`: `window_ids` recovers i. Small
    `shard_bytes` gives several files of several row groups. Returns manifest.json.
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    dtype = np.dtype(np.uint16)
    group_rows = shard.row_group_rows(seq_len, dtype, shard_bytes)
    for split, count in windows.items():
        stream = (np.arange(count * seq_len + 1) % vocab_size).astype(dtype)
        groups = shard.window_groups([stream], seq_len, seq_len, group_rows)
        files += shard.write_shards(groups, directory, split, dtype, shard_bytes)
    manifest = directory / "manifest.json"
    manifest.write_text(
        json.dumps({"seq_len": seq_len, "stride": seq_len, "dtype": "uint16", "vocab_size": vocab_size, "files": files})
    )
    return manifest


def window_ids(inputs: torch.Tensor) -> list[int]:
    """Which windows of a `make_shards` stream (with a large vocabulary) a batch holds."""
    return (inputs[:, 0] // SEQ_LEN).tolist()


def run_python(code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run `code` in a fresh interpreter in the repository; returns stdout, fails on an error exit."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


RECORD_METRICS = """
import json, os, sys
from pathlib import Path
from model.train import RunSpec, run

metrics = {}
run(RunSpec.model_validate_json(Path(sys.argv[1]).read_text()), lambda step, m: metrics.update({step: dict(m)}))
if os.environ.get("RANK", "0") == "0":
    print(json.dumps(metrics))
"""


def write_spec(directory: Path, name: str, spec: RunSpec) -> Path:
    path = directory / f"{name}.json"
    path.write_text(spec.model_dump_json())
    return path


def torchrun(spec: Path, nproc: int, *rendezvous: str, timeout: float = 300) -> dict[str, dict[str, float]]:
    """Train `spec` under torchrun (`--standalone` unless a rendezvous is given); rank 0's step metrics by step."""
    script = spec.with_name("record_metrics.py")
    script.write_text(RECORD_METRICS)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(rendezvous or ["--standalone"]),
        f"--nproc_per_node={nproc}",
        str(script),
        str(spec),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
