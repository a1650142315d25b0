"""Replay of pretraining windows in fine-tuning batches: their layout and exact resume."""

from __future__ import annotations

import pytest
import torch

from model.data import WindowLoader
from model.finetune_data import PairBatches
from model.replay import ReplayBatches, replay_rows
from model.scoring import IGNORE
from support.corpus import make_shards, window_ids

PAIR_ROWS = torch.arange(7 * 24).view(7, 24)  # 7 task rows of 24 tokens, longer than the 16-token windows


def batches(shards, state=None) -> ReplayBatches:
    data = ReplayBatches(
        PairBatches(PAIR_ROWS, PAIR_ROWS + 1000, batch_size=3, seed=5), WindowLoader(shards, "train", 2, seed=1)
    )
    if state is not None:
        data.load_state_dict(state)
    return data


def test_each_batch_is_task_rows_then_padded_windows_and_resumes_exactly(tmp_path):
    shards = make_shards(tmp_path / "shards", {"train": 10}, vocab_size=1024)
    stream = iter(batches(shards))
    uninterrupted = [next(stream) for _ in range(7)]  # both streams cross an epoch boundary

    inputs, targets = uninterrupted[0]
    assert inputs.shape == targets.shape == (5, 24)
    assert (inputs[:3, 0] % 24 == 0).all() and (targets[:3] >= 1000).all()  # task rows first
    windows = WindowLoader(shards, "train", 2, seed=1)
    expected_inputs, expected_targets = next(iter(windows))
    assert torch.equal(inputs[3:, :16], expected_inputs) and torch.equal(targets[3:, :16], expected_targets)
    # Padded with each window's last token (the model is causal: nothing after a row changes it), never scored.
    assert (inputs[3:, 16:] == inputs[3:, 15:16]).all() and (targets[3:, 16:] == IGNORE).all()
    assert sorted(window_ids(torch.cat([x[3:, :16] for x, _ in uninterrupted[:5]]))) == list(range(10))

    first = batches(shards)
    first_stream = iter(first)
    [next(first_stream) for _ in range(3)]
    resumed = iter(batches(shards, first.state_dict()))
    for expected in uninterrupted[3:]:
        actual = next(resumed)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize(("fraction", "rows"), [(0.0, 0), (0.01, 1), (0.25, 2), (0.5, 4), (0.99, 7)])
def test_replay_takes_the_nearest_share_of_rows_but_leaves_the_task_one(fraction, rows):
    assert replay_rows(fraction, batch_size=8) == rows
