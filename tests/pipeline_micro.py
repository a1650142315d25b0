"""A micro pipeline config for the end-to-end tests: a generated Python corpus, a 300-token
vocabulary, a one-layer GPT, a few steps per stage. One pipeline run takes seconds. And what
the registered text generator must answer, computed from the checkpoint it was made from."""

from __future__ import annotations

from pathlib import Path

import yaml
from tokenizers import Tokenizer

from model.checkpoint import load_model
from model.generate import generate
from model.special_tokens import EOS_ID

OPERATORS = (("plus", "+"), ("minus", "-"), ("times", "*"))


def write_corpus(directory: Path, files: int = 80) -> Path:
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


def write_config(root: Path, name: str) -> Path:
    """`root/micro.yaml` over `root/corpus`, with its workspace in `root/workspace`."""
    config = {
        "name": name,
        "workspace": str(root / "workspace"),
        "ingest": {"source": str(write_corpus(root / "corpus")), "min_chars": 16, "val_fraction": 0.25},
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


def greedy_completions(checkpoint: Path, tokenizer: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` by the checkpoint's weights, each prompt starting a
    document (after <|endoftext|>, as in training): what the registered model must answer
    at temperature 0."""
    tok = Tokenizer.from_file(str(tokenizer))
    ids = [[EOS_ID, *tok.encode(prompt, add_special_tokens=False).ids] for prompt in prompts]
    completions = generate(load_model(checkpoint), ids, max_new_tokens, temperature=0.0, eos_id=EOS_ID)
    return [tok.decode(tokens, skip_special_tokens=True) for tokens in completions]
