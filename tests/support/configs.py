"""Micro configurations: the GPT and training settings the engine and pretrain tests share,
and the config files of the two micro worlds: data preparation over a few standard-library
modules, and the whole pipeline over generated modules (a 320-token vocabulary, a one-layer
GPT, a few steps per stage: one pipeline run takes seconds)."""

from __future__ import annotations

from pathlib import Path

import yaml

from model.config import GPTConfig
from model.train import TrainConfig
from support.corpus import copy_stdlib_modules, write_python_modules
from tasks.pretrain import PretrainConfig

MICRO_GPT = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


# A few CPU steps of MICRO_GPT on `RandomBatches` or `make_shards`' shards.
MICRO_TRAINING = dict(
    max_steps=4,
    batch_tokens=128,
    micro_batch_size=4,
    warmup_steps=1,
    eval_every=0,
    checkpoint_every=1,
    lr=1e-2,
    device="cpu",
)


def micro_train_config(**overrides) -> TrainConfig:
    """The engine's config: MICRO_TRAINING, a checkpoint after each step; `overrides` win."""
    return TrainConfig(**{**MICRO_TRAINING, **overrides})


def micro_pretrain_config(**overrides) -> PretrainConfig:
    """The pretrain stage's config: MICRO_TRAINING, a checkpoint every 2 steps, 8 val windows;
    `overrides` (the stage's launch fields too) win."""
    return PretrainConfig(**{**MICRO_TRAINING, "checkpoint_every": 2, "val_windows": 8, **overrides})


def write_data_config(root: Path) -> Path:
    """`root/micro.yaml`: the data stages over standard-library modules (vocab 300, seq_len 32,
    several shard files), with its workspace in `root/workspace`."""
    source = copy_stdlib_modules(root / "src")
    config = root / "micro.yaml"
    config.write_text(
        "name: micro\n"
        f"workspace: {root / 'workspace'}\n"
        f"ingest: {{source: {source}, val_fraction: 0.3, seed: 0}}\n"
        "bpe: {vocab_size: 300, min_frequency: 2}\n"
        "shard: {seq_len: 32, shard_bytes: 16384}\n"
    )
    return config


def write_pipeline_config(root: Path, name: str) -> Path:
    """`root/micro.yaml`: every stage over generated modules in `root/corpus`, with its workspace
    in `root/workspace`."""
    config = {
        "name": name,
        "workspace": str(root / "workspace"),
        "ingest": {"source": str(write_python_modules(root / "corpus")), "min_chars": 16, "val_fraction": 0.25},
        "bpe": {"vocab_size": 320, "min_frequency": 2},
        "shard": {"seq_len": 32, "shard_bytes": 65536},
        "model": {"preset": None, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "pretrain": {
            "max_steps": 20,
            "batch_tokens": 256,
            "micro_batch_size": 8,
            "warmup_steps": 2,
            "lr": 1.0e-2,
            "checkpoint_every": 10,
            "eval_every": 0,
            "device": "cpu",
        },
        "evaluate": {"prompts": ["def plus"], "max_new_tokens": 8, "max_documents": 8},
        "finetune": {
            "max_steps": 5,
            "batch_tokens": 128,
            "micro_batch_size": 4,
            "warmup_steps": 1,
            "eval_pairs": 2,
            "eval_max_new_tokens": 8,
            "device": "cpu",
        },
    }
    path = root / "micro.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
