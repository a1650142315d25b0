"""Micro corpora and what the stages make of them: Python source trees, a corpus table, a toy
tokenizer, val shards, shards whose windows say which window they are, and a resumable stream
of random batches. Each builds in a second."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers

from model.special_tokens import SPECIAL_TOKENS, special_ids
from tasks import shard
from tasks.bpe import new_tokenizer
from tasks.core.workspace import sha256_file
from tasks.ingest import split_of

SEQ_LEN = 16

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "héllo wörld ✓ — naïve café\n",
    "for i in range(10):\n    print(i * i)\n",
]

STDLIB_FILES = ["abc.py", "bisect.py", "colorsys.py", "fnmatch.py", "heapq.py", "keyword.py", "shlex.py", "textwrap.py"]

OPERATORS = (("plus", "+"), ("minus", "-"), ("times", "*"))


def copy_stdlib_modules(directory: Path) -> Path:
    """A few standard-library modules: real Python, the same bytes on every run."""
    directory.mkdir(parents=True)
    for name in STDLIB_FILES:
        shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / name, directory / name)
    return directory


def write_python_modules(directory: Path, files: int = 80) -> Path:
    """Python modules with documented functions: pretraining text and docstring pairs alike."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        name, op = OPERATORS[i % len(OPERATORS)]
        (directory / f"mod{i:03d}.py").write_text(
            f"def {name}_{i}(x, y):\n"
            f'    """Return x {name} y, then {name} {i}."""\n'
            f"    total = x {op} y\n"
            f"    return total {op} {i}\n\n\n"
            f"class Box{i}:\n"
            f'    """A box holding {i} items."""\n\n'
            f"    def __init__(self):\n"
            f"        self.items = list(range({i}))\n"
        )
    return directory


def write_corpus(path: Path, documents: list[tuple[str, str, str]]) -> Path:
    """Corpus Parquet with the ingest stage's columns: (id, text, split) rows."""
    ids, texts, splits = zip(*documents)
    pq.write_table(pa.table({"id": list(ids), "text": list(texts), "split": list(splits)}), path)
    return path


def toy_tokenizer(path: Path, texts: list[str] = TEXTS, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer (the pipeline's kind) trained on `texts`, saved to `path`."""
    tokenizer: Tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


def write_val_shards(
    directory: Path, tokenizer: Tokenizer, tokenizer_path: Path, texts: list[str], seq_len: int
) -> Path:
    """Val shards as the shard stage writes them: the stream (documents each followed by
    <|endoftext|>) cut into disjoint windows of seq_len + 1 tokens sharing one token."""
    eos = special_ids(tokenizer).eos
    stream: list[int] = []
    for text in texts:
        stream += [*tokenizer.encode(text, add_special_tokens=False).ids, eos]
    windows = [stream[i : i + seq_len + 1] for i in range(0, len(stream) - seq_len, seq_len)]
    directory.mkdir(parents=True, exist_ok=True)
    column = pa.FixedSizeListArray.from_arrays(pa.array([t for w in windows for t in w], pa.uint16()), seq_len + 1)
    pq.write_table(pa.table({"tokens": column}), directory / "val-00000.parquet")
    manifest = {
        "fingerprint": "test-shards",
        "seq_len": seq_len,
        "stride": seq_len,
        "dtype": "uint16",
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": sha256_file(tokenizer_path),
        "eos_id": eos,
        "files": [
            {
                "path": "val-00000.parquet",
                "split": "val",
                "rows": len(windows),
                "tokens": len(windows) * (seq_len + 1),
                "sha256": sha256_file(directory / "val-00000.parquet"),
            }
        ],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return directory


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


def seed_for(ids: list[str]) -> int:
    """A split seed that puts these few documents in both splits (an empty split is fatal)."""
    return next((seed for seed in range(100) if {split_of(i, 0.5, seed) for i in ids} == {"train", "val"}), 0)
