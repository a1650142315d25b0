"""The compiled model on the CPU, so that a change that breaks the graph fails in CI: the training
forward with the chunked loss traced whole (fullgraph=True: a graph break is an error), and no
recompile over training steps, checkpoints and a resume; and flex attention compiled for the
sparse layers' band against SDPA with the same band as a boolean mask (an independent path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from model.gpt import GPT, banded_block_mask, banded_flex_attention
from model.train import train
from support.configs import MICRO_GPT, micro_train_config
from support.corpus import RandomBatches


def test_training_compiles_one_graph_across_steps_checkpoints_and_a_resume(tmp_path, monkeypatch):
    # aot_eager traces forward and backward as Inductor would, without generating code: enough
    # to count graphs, and seconds instead of a minute on a loaded CPU.
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile(model, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    counters.clear()
    config = micro_train_config(max_steps=2, compile=True)  # a checkpoint after each step
    assert MICRO_GPT.loss_chunk  # the chunked loss is inside the traced forward
    train(GPT(MICRO_GPT), config, RandomBatches(), None, tmp_path)
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1  # two steps of two micro-batches each, two checkpoints

    resumed = train(GPT(MICRO_GPT), config.model_copy(update={"max_steps": 3}), RandomBatches(), None, tmp_path)
    assert resumed.steps == 3 and resumed.tokens == config.batch_tokens  # it did resume, and trained a step
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1  # the new model object reuses the graph: no recompile


def test_compiled_flex_attention_over_the_band_equals_masked_sdpa():
    torch.manual_seed(0)
    seq, window, head_dim = 256, 64, 16  # flex attention's blocks are 128 positions: two of them
    q, k, v = (torch.randn(2, 2, seq, head_dim) for _ in range(3))
    positions = torch.arange(seq)
    band = (positions[None, :] <= positions[:, None]) & (positions[:, None] - positions[None, :] < window)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    compiled = torch.compile(banded_flex_attention, fullgraph=True, dynamic=False)  # Inductor's CPU template
    actual = compiled(q, k, v, banded_block_mask(seq, window, "cpu"))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
