"""Checkpoints: keep-last-K, atomic directories, and weights that move between compiled and
uncompiled models."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from model.checkpoint import WEIGHTS, checkpoint_dirs, latest_checkpoint, load_model, load_weights, save_checkpoint
from model.errors import UserError
from model.gpt import GPT
from model.train import train
from support.configs import MICRO_GPT, micro_train_config
from support.corpus import RandomBatches


def test_only_the_newest_k_are_kept(tmp_path):
    model = GPT(MICRO_GPT)
    for step in (5, 10, 15, 20, 25):
        save_checkpoint(tmp_path, step, model, {"optimizer": {}}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-20", "step-25"]  # no temporary leftovers
    assert latest_checkpoint(tmp_path) == tmp_path / "step-25"
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-20", "step-25"]


def test_a_checkpoint_that_fails_midway_is_never_seen_and_its_leftovers_go(tmp_path, monkeypatch):
    model = GPT(MICRO_GPT)
    save_checkpoint(tmp_path, 5, model, {}, keep=3)

    def disk_full(*args, **kwargs):  # torch.save writes the state file, after the weights
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(tmp_path, 10, model, {}, keep=3)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-5"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".step-10.tmp-")]  # the half-written one
    save_checkpoint(tmp_path, 10, model, {}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-5"]


def test_numeric_order_not_text_order(tmp_path):
    model = GPT(MICRO_GPT)
    for step in (9, 10):
        save_checkpoint(tmp_path, step, model, {}, keep=5)
    assert latest_checkpoint(tmp_path).name == "step-10"


def test_weights_round_trip_with_the_head_tied(tmp_path):
    torch.manual_seed(0)
    model = GPT(MICRO_GPT)
    path = save_checkpoint(tmp_path, 1, model, {}, keep=1)
    loaded = load_model(path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(actual, expected), name


def test_weights_of_another_model_are_refused(tmp_path):
    path = save_checkpoint(tmp_path, 1, GPT(MICRO_GPT), {}, keep=1)
    other = GPT(MICRO_GPT.model_copy(update={"n_layer": 3}))
    with pytest.raises(UserError, match="model.safetensors: does not match the model"):
        load_weights(other, path)


def test_a_compiled_run_checkpoints_plain_weights_that_load_both_ways(tmp_path):
    """The engine's torch.compile path on CPU (the one compiling test: it is slow): it trains as the
    eager model does (vocabulary 64 padded to 128, the chunked loss, all inside the graph), and its
    checkpoints hold the plain weights."""
    losses = {}
    for compile in (False, True):
        torch.manual_seed(0)
        trained = GPT(MICRO_GPT)
        config = micro_train_config(compile=compile, max_steps=3)
        result = train(
            trained,
            config,
            RandomBatches(),
            None,
            tmp_path / str(compile),
            callback=lambda step, m, key=compile: losses.setdefault(key, []).append(m["loss"]),
        )
    # The losses after one and two updates. (Not the weights: Adam turns float noise in a near-zero
    # gradient into a full-size step, so single elements may differ by up to lr.)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    weights = safetensors.torch.load_file(result.checkpoint / WEIGHTS)
    assert not any(key.startswith(("_orig_mod", "module.")) for key in weights)

    plain = load_model(result.checkpoint)
    idx = torch.randint(64, (2, 16))
    torch.testing.assert_close(plain(idx).logits, trained(idx).logits, rtol=0, atol=0)

    compiled = torch.compile(GPT(MICRO_GPT))
    load_weights(compiled, result.checkpoint)
    for key, value in compiled.state_dict().items():
        assert torch.equal(value, plain.state_dict()[key.removeprefix("_orig_mod.")]), key


def test_checkpoints_come_by_minutes_when_steps_are_slow(tmp_path, monkeypatch):
    """Each step takes 70 s on a fake clock: with checkpoint_minutes 2, one checkpoint every second step."""
    now = [0.0]
    monkeypatch.setattr("model.train.clock", lambda: now[0])

    def slow_step(step, metrics):
        now[0] += 70

    config = micro_train_config(max_steps=6, checkpoint_every=0, checkpoint_minutes=2, keep_checkpoints=10)
    train(GPT(MICRO_GPT), config, RandomBatches(), None, tmp_path / "minutes", callback=slow_step)
    # due at 140 s (step 3: 140 - 0 >= 120), then at 280 s (step 5: 280 - 140), and the final one
    assert [p.name for p in checkpoint_dirs(tmp_path / "minutes" / "checkpoints")] == ["step-3", "step-5", "step-6"]

    config = micro_train_config(max_steps=6, checkpoint_every=4, checkpoint_minutes=0, keep_checkpoints=10)
    train(GPT(MICRO_GPT), config, RandomBatches(), None, tmp_path / "steps", callback=slow_step)
    assert [p.name for p in checkpoint_dirs(tmp_path / "steps" / "checkpoints")] == ["step-4", "step-6"]
