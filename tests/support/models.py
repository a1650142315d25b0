"""Tiny GPTs for the model, evaluation and fine-tuning tests, their checkpoints, and what a
checkpoint must answer when greedy."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import torch
from tokenizers import Tokenizer, trainers

from model.checkpoint import CheckpointTokens, attach_tokenizer, load_model, save_checkpoint, save_model_directory
from model.config import GPTConfig
from model.generate import generate
from model.gpt import GPT
from model.special_tokens import SPECIAL_TOKENS, special_ids
from tasks.bpe import new_tokenizer

Module = TypeVar("Module", bound=torch.nn.Module)


@torch.no_grad()
def perturbed(model: Module, scale: float = 0.1) -> Module:
    """Noise on every parameter. GPT-2's initialisation leaves LayerNorm weights at 1 and every
    bias at 0, where a misplaced LayerNorm or a dropped bias would still match a reference."""
    for p in model.parameters():
        p.add_(scale * torch.randn_like(p))
    return model


def tiny_gpt(vocab_size: int, block_size: int = 16, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32))


def save_base_checkpoint(model: GPT, directory: Path) -> Path:
    """The model as the pretraining stage would leave it: `checkpoints/step-N/`."""
    return save_checkpoint(directory / "checkpoints", 1, model, state={}, keep=1)


def greedy_completions(checkpoint: Path, tokenizer: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of `prompts` by the checkpoint's weights: what the registered model
    must answer at temperature 0. A model fine-tuned by gptflow (its checkpoint's tokens.json
    says "pair") is prompted `prompt <|sep|>`; any other continues a document (after
    <|endoftext|>, as in pretraining)."""
    tok = Tokenizer.from_file(str(tokenizer))
    special = special_ids(tok)
    tokens_file = Path(checkpoint) / "tokens.json"
    finetuned = tokens_file.is_file() and json.loads(tokens_file.read_text())["prompt_format"] == "pair"
    encoded = [tok.encode(prompt, add_special_tokens=False).ids for prompt in prompts]
    ids = [[*row, special.sep] if finetuned else [special.eos, *row] for row in encoded]
    eos = special.eos
    completions = generate(load_model(checkpoint), ids, max_new_tokens, temperature=0.0, eos_id=eos)
    return [tok.decode(tokens, skip_special_tokens=True) for tokens in completions]


def checkpoint_to_generate_from(directory: Path, config: GPTConfig, texts: Iterable[str], vocab_size: int) -> Path:
    """A checkpoint `gptflow generate` opens, `directory/checkpoint`: a GPT of `config`'s shape
    (random weights, its vocabulary the tokenizer's), a byte-level BPE tokenizer trained on
    `texts` up to `vocab_size`, and the tokens.json of a pretrained model."""
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer_file = directory / "source-tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    checkpoint = directory / "checkpoint"
    save_model_directory(GPT(config.model_copy(update={"vocab_size": tokenizer.get_vocab_size()})), checkpoint)
    tokens = CheckpointTokens(special_ids=special_ids(tokenizer), prompt_format="document")
    attach_tokenizer(checkpoint, tokenizer_file, tokens)
    return checkpoint
