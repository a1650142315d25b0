"""Micro fixtures for the model, evaluation and fine-tuning tests: a toy tokenizer, a tiny GPT, a
Python corpus and val shards small enough to build in a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, pre_tokenizers, trainers

from model.checkpoint import save_checkpoint
from model.config import GPTConfig
from model.gpt import GPT
from model.special_tokens import EOS_ID, SPECIAL_TOKENS
from tasks.bpe import new_tokenizer
from tasks.core.workspace import sha256_file

Module = TypeVar("Module", bound=torch.nn.Module)


@torch.no_grad()
def perturbed(model: Module) -> Module:
    """Noise on every parameter. GPT-2's initialisation leaves LayerNorm weights at 1 and every
    bias at 0, where a misplaced LayerNorm or a dropped bias would still match a reference."""
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    return model


TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "héllo wörld ✓ — naïve café\n",
    "for i in range(10):\n    print(i * i)\n",
]


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


def tiny_gpt(vocab_size: int, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))


def save_base_checkpoint(model: GPT, directory: Path) -> Path:
    """The model as the pretraining stage would leave it: `checkpoints/step-N/`."""
    return save_checkpoint(directory / "checkpoints", 1, model, state={}, keep=1)


def write_corpus(path: Path, documents: list[tuple[str, str, str]]) -> Path:
    """Corpus Parquet with the ingest stage's columns: (id, text, split) rows."""
    ids, texts, splits = zip(*documents)
    pq.write_table(pa.table({"id": list(ids), "text": list(texts), "split": list(splits)}), path)
    return path


def write_val_shards(
    directory: Path, tokenizer: Tokenizer, tokenizer_path: Path, texts: list[str], seq_len: int
) -> Path:
    """Val shards as the shard stage writes them: the stream (documents each followed by
    <|endoftext|>) cut into disjoint windows of seq_len + 1 tokens sharing one token."""
    stream: list[int] = []
    for text in texts:
        stream += [*tokenizer.encode(text, add_special_tokens=False).ids, EOS_ID]
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
        "eos_id": EOS_ID,
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
