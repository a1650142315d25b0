"""The yardstick for the engine's speed: a GPT-2 training step written as nanoGPT's train.py runs it.

nanoGPT (github.com/karpathy/nanoGPT, train.py) does, per step: forward with targets (the
model computes the whole logits and a mean F.cross_entropy), backward, clip the gradient
norm to 1.0, AdamW step (fused on CUDA only), zero_grad(set_to_none=True), `loss.item()`;
under bf16 autocast on CUDA, and torch.compile on the whole model when asked. Its model is
the one `model.gpt.GPT` follows, so GPT with its speed choices off (no vocabulary padding,
no chunked loss) is that model; the loop below is nanoGPT's, not the engine's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from model.config import GPTConfig
from model.gpt import GPT


def plain_config(config: GPTConfig) -> GPTConfig:
    """`config` as nanoGPT's model computes it: the real vocabulary, whole logits."""
    return config.model_copy(update={"vocab_multiple": 1, "loss_chunk": 0})


def plain_training_steps(
    config: GPTConfig, batch_size: int, seq_len: int, device: torch.device, bf16: bool, compile: bool
) -> Iterator[float]:
    """Train a fresh seeded model one step per `next()`, yielding each step's tokens/s.

    A generator, so that a benchmark can interleave its steps with the engine's, step by step."""
    torch.manual_seed(0)
    model = GPT(plain_config(config)).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [  # nanoGPT's configure_optimizers: decay on matrices only
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    net = torch.compile(model) if compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    generator = torch.Generator().manual_seed(0)
    while True:
        started = time.perf_counter()  # the batch is drawn inside the step, as the engine's timing counts it
        windows = torch.randint(config.vocab_size, (batch_size, seq_len + 1), generator=generator)
        inputs, targets = windows[:, :-1].to(device), windows[:, 1:].to(device)
        with autocast:
            loss = net(inputs, targets).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the host sync nanoGPT's loop makes (it also waits for the step to finish)
        yield batch_size * seq_len / (time.perf_counter() - started)
