"""FSDP2 and activation checkpointing (model.parallel), on CPU with gloo.

The reference is always a plain run in one process with the same global batch: FSDP2 on
2 ranks must match it step by step, and its checkpoints (gathered, or sharded DCP) must
resume in 1 process and in 2 to the same losses and weights as the run never stopped.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import safetensors
import safetensors.torch
import torch

from model.checkpoint import WEIGHTS, consolidate, load_model
from model.errors import UserError
from model.gpt import GPT
from model.parallel import checkpoint_blocks
from model.train import RunSpec, run, train
from support.configs import MICRO_GPT, micro_train_config
from support.corpus import RandomBatches, make_shards
from support.processes import torchrun, write_spec

STEPS = 4


def spec_for(tmp_path, name, shards, **train):
    # 2 ranks x 2 micro-batches of 4 windows of 16 tokens per step; clipping active (norms > 0.5)
    config = micro_train_config(
        **{
            "max_steps": STEPS,
            "batch_tokens": 256,
            "checkpoint_every": 2,
            "keep_checkpoints": 5,
            "grad_clip": 0.5,
            **train,
        }
    )
    return RunSpec(model=MICRO_GPT, train=config, shards=shards, val_windows=16, out_dir=tmp_path / name)


def training_steps(metrics: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """The steps' figures, without step 0 (the initial weights' val_loss only: `eval_at_start`)."""
    return {step: m for step, m in metrics.items() if step > 0}


def in_process(spec: RunSpec) -> dict[int, dict[str, float]]:
    metrics = {}
    run(spec, lambda step, m: metrics.update({step: dict(m)}))
    return training_steps(metrics)


def under_torchrun(tmp_path, name, spec: RunSpec, nproc=2) -> dict[int, dict[str, float]]:
    return training_steps({int(step): m for step, m in torchrun(write_spec(tmp_path, name, spec), nproc).items()})


def resume_from(tmp_path, name, checkpoint, shards, **train) -> RunSpec:
    """A run directory holding only `checkpoint`, to train on to STEPS."""
    spec = spec_for(tmp_path, name, shards, **train)
    shutil.copytree(checkpoint, spec.out_dir / "checkpoints" / checkpoint.name)
    return spec


def assert_same_steps(actual, expected, steps):
    assert sorted(actual) == list(steps)
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert actual[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)
    assert actual[STEPS]["val_loss"] == pytest.approx(expected[STEPS]["val_loss"], rel=1e-5)


def assert_same_weights(actual_dir, expected_dir):
    actual = safetensors.torch.load_file(actual_dir / WEIGHTS)
    expected = safetensors.torch.load_file(expected_dir / WEIGHTS)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Shards and the uninterrupted one-process run on them."""
    tmp_path = tmp_path_factory.mktemp("reference")
    shards = make_shards(tmp_path / "shards", {"train": 200, "val": 40})
    spec = spec_for(tmp_path, "whole", shards)
    metrics = in_process(spec)
    assert all(m["grad_norm"] > 0.5 for m in metrics.values())  # so clipping changes every step
    return shards, metrics, spec.out_dir / "checkpoints"


def test_fsdp_matches_one_process_and_its_checkpoint_resumes_on_1_and_2_ranks(tmp_path, reference):
    shards, whole, whole_checkpoints = reference
    fsdp = spec_for(tmp_path, "fsdp", shards, parallel="fsdp")
    assert_same_steps(under_torchrun(tmp_path, "fsdp", fsdp), whole, range(1, STEPS + 1))
    assert_same_weights(fsdp.out_dir / "checkpoints/step-4", whole_checkpoints / "step-4")
    with safetensors.safe_open(fsdp.out_dir / "checkpoints/step-4" / WEIGHTS, "pt") as weights:
        assert weights.metadata() == {"transformer.wte.weight": "lm_head.weight"}  # the tie, stored once

    saved = fsdp.out_dir / "checkpoints/step-2"
    one = resume_from(tmp_path, "resumed-on-1", saved, shards)
    assert_same_steps(in_process(one), whole, [3, 4])
    assert_same_weights(one.out_dir / "checkpoints/step-4", whole_checkpoints / "step-4")

    two = resume_from(tmp_path, "resumed-on-2", saved, shards, parallel="fsdp")
    assert_same_steps(under_torchrun(tmp_path, "resumed-on-2", two), whole, [3, 4])
    assert_same_weights(two.out_dir / "checkpoints/step-4", whole_checkpoints / "step-4")


def test_sharded_dcp_checkpoint_resumes_in_one_process_only_when_opted_in(tmp_path, reference):
    shards, whole, whole_checkpoints = reference
    fsdp = spec_for(tmp_path, "fsdp-dcp", shards, parallel="fsdp", checkpoint_format="dcp")
    under_torchrun(tmp_path, "fsdp-dcp", fsdp)
    saved = fsdp.out_dir / "checkpoints/step-2"
    assert not (saved / WEIGHTS).exists() and (saved / "dcp/.metadata").is_file()

    refused = resume_from(tmp_path, "not-opted-in", saved, shards)
    with pytest.raises(UserError, match="checkpoint_format: dcp"):
        in_process(refused)

    one = resume_from(tmp_path, "dcp-on-1", saved, shards, checkpoint_format="dcp")
    assert_same_steps(in_process(one), whole, [3, 4])
    consolidate(one.out_dir / "checkpoints/step-4")
    assert_same_weights(one.out_dir / "checkpoints/step-4", whole_checkpoints / "step-4")


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    model = GPT(MICRO_GPT.model_copy(update={"dropout": 0.1}))  # dropout: the recomputation must replay its masks
    checkpointed = copy.deepcopy(model)
    checkpoint_blocks(checkpointed)
    assert checkpointed.state_dict().keys() == model.state_dict().keys()  # checkpoints keep their names
    calls = []
    for block in checkpointed.transformer.h:
        mlp = block._checkpoint_wrapped_module.mlp
        mlp.forward = lambda x, forward=mlp.forward: calls.append(1) or forward(x)
    inputs, targets = torch.randint(64, (4, 16)), torch.randint(64, (4, 16))

    losses = []
    for net in (model, checkpointed):
        torch.manual_seed(1)
        loss = net(inputs, targets).loss
        loss.backward()
        losses.append(loss.item())

    assert len(calls) == 2 * MICRO_GPT.n_layer  # forward, then again in backward
    assert losses[1] == losses[0]
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-8, msg=name)


def test_activation_checkpointing_trains_like_the_plain_engine(tmp_path):
    losses = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        result = train(
            GPT(MICRO_GPT),
            micro_train_config(activation_checkpointing=checkpointing, max_steps=3),
            RandomBatches(),
            None,
            tmp_path / str(checkpointing),
            lambda step, m, key=checkpointing: losses.setdefault(key, []).append(m["loss"]),
        )
        plain = load_model(result.checkpoint)  # saved under the plain names: loads without the wrapper
        assert type(plain.transformer.h[0]).__name__ == "Block"
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
