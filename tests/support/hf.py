"""A tiny Hugging Face GPT-2 model directory, built offline: what `model.init_from`, `gptflow
generate` and `gptflow export` are tested against (a stand-in for the hub's `gpt2`).

Its tokenizer is GPT-2-style byte-level BPE whose last id is `<|endoftext|>` (as GPT-2's
50256), with no `<|pad|>` or `<|sep|>`: gptflow must add them. The weights are random and
perturbed (GPT-2's init leaves LayerNorms at 1 and biases at 0, hiding misplaced ones).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, pre_tokenizers, trainers

from model.special_tokens import EOS
from support.corpus import TEXTS
from support.models import perturbed
from tasks.bpe import new_tokenizer

BLOCK_SIZE = 128


def tiny_gpt2_directory(directory: Path, vocab_size: int = 300, block_size: int = BLOCK_SIZE) -> Path:
    """Write config.json, model.safetensors (GPT2LMHeadModel's layout) and tokenizer.json into `directory`."""
    import transformers

    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    tokenizer.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    eos = tokenizer.token_to_id(EOS)
    assert eos == tokenizer.get_vocab_size() - 1  # the last id, as GPT-2's
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=block_size,
        n_layer=2,
        n_head=2,
        n_embd=32,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    with torch.no_grad():
        model = perturbed(transformers.GPT2LMHeadModel(config)).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
