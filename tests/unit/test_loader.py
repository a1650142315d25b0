"""The shard loader: every window exactly once per epoch, whatever the ranks and workers;
resuming on a different number of ranks; tampered shards refused."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import pytest

from model.data import WindowLoader
from model.errors import UserError
from support.corpus import make_shards, window_ids

WINDOWS = 290  # 10 row groups of 30 and one of 20, over 4 files
BATCH = 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), {"train": WINDOWS, "val": 50}, vocab_size=1 << 16)


def loaders(manifest, world_size, **kwargs):
    return [
        WindowLoader(manifest, "train", BATCH, rank=rank, world_size=world_size, seed=7, buffer_row_groups=3, **kwargs)
        for rank in range(world_size)
    ]


def global_order(ranks: list[WindowLoader], steps: int) -> list[int]:
    """The windows in the order the ranks consumed them: step by step, rank by rank."""
    streams = [iter(loader) for loader in ranks]
    order = []
    for _ in range(steps):
        for stream in streams:
            order += window_ids(next(stream)[0])
    return order


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_window_exactly_once_per_epoch(manifest, world_size, workers):
    per_step = world_size * BATCH
    steps = -(-2 * WINDOWS // per_step)  # two epochs and a bit
    order = global_order(loaders(manifest, world_size, workers=workers), steps)
    first, second = order[:WINDOWS], order[WINDOWS : 2 * WINDOWS]
    assert sorted(first) == list(range(WINDOWS))
    assert sorted(second) == list(range(WINDOWS))
    assert first != second and first != sorted(first)  # shuffled, differently each epoch
    # The order is global: the same for any number of ranks and workers.
    assert order[:WINDOWS] == global_order(loaders(manifest, 1), -(-WINDOWS // BATCH))[:WINDOWS]


def test_resume_on_a_different_rank_count_sees_exactly_the_rest(manifest):
    before = loaders(manifest, 2, workers=2)
    seen = global_order(before, steps=13)  # 104 windows
    state = before[0].state_dict()
    assert state == before[1].state_dict() == {"position": 104}

    after = loaders(manifest, 3)
    for loader in after:
        loader.load_state_dict(state)
    rest = global_order(after, steps=-(-(WINDOWS - 104) // (3 * BATCH)))[: WINDOWS - 104]
    assert Counter(seen + rest) == Counter(range(WINDOWS))


def test_validation_order_is_the_stream_and_repeats(manifest):
    loader = WindowLoader(manifest, "val", 5, shuffle=False)
    first = [window_ids(inputs) for inputs, _ in islice(loader, 3)]
    assert first == [list(range(0, 5)), list(range(5, 10)), list(range(10, 15))]
    assert [window_ids(inputs) for inputs, _ in islice(loader, 3)] == first


def test_targets_are_the_next_tokens(manifest):
    inputs, targets = next(iter(WindowLoader(manifest, "train", 8)))
    assert inputs.shape == targets.shape == (8, 16)
    assert (targets[:, :-1] == inputs[:, 1:]).all()
    assert (targets[:, -1] == inputs[:, -1] + 1).all()  # the stream counts up


def test_a_tampered_shard_is_refused_by_name(tmp_path):
    manifest = make_shards(tmp_path, {"train": 200}, vocab_size=1 << 16)
    shard = tmp_path / "train-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(data)
    with pytest.raises(UserError, match="train-00001.parquet: contents no longer match the sha256"):
        WindowLoader(manifest, "train", BATCH)
