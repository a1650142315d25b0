"""The training engine against independent computations: a hand-written training loop, the
schedule's formula, one big batch instead of accumulated micro-batches, a hand count of FLOPs
and decayed parameters, MFU against a fixed peak."""

from __future__ import annotations

import copy
import math
import shutil
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import checkpoint_dirs, load_model, load_state
from model.errors import UserError
from model.gpt import GPT
from model.mfu import Peak
from model.muon import Muon
from model.schedule import learning_rate
from model.train import NonFiniteLoss, TrainConfig, accumulate_gradients, configure_optimizers, train
from support.configs import MICRO_GPT, micro_train_config
from support.corpus import RandomBatches

# Validation data for the engine: a few fixed batches, scored whole at each validation.
VAL_BATCHES = list(islice(RandomBatches(seed=1), 2))


def test_cosine_schedule_follows_its_formula():
    kwargs = dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(0, **kwargs) == pytest.approx(0.1)  # (0 + 1) / 10
    assert learning_rate(9, **kwargs) == pytest.approx(1.0)
    # after warmup: 0.1 + 0.45 * (1 + cos(pi * (step - 10 + 1) / 100))
    for step in (10, 59, 85, 109):
        expected = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 9) / 100))
        assert learning_rate(step, **kwargs) == pytest.approx(expected)
    assert learning_rate(109, **kwargs) == pytest.approx(0.1)


def test_wsd_schedule_holds_then_decays_linearly():
    kwargs = dict(lr=2.0, min_lr=0.0, warmup_steps=5, max_steps=100, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(2, **kwargs) == pytest.approx(2.0 * 3 / 5)
    assert learning_rate(5, **kwargs) == learning_rate(79, **kwargs) == 2.0  # stable until step 80
    assert learning_rate(80, **kwargs) == pytest.approx(2.0 * (1 - 1 / 20))
    assert learning_rate(89, **kwargs) == pytest.approx(2.0 * (1 - 10 / 20))
    assert learning_rate(99, **kwargs) == pytest.approx(0.0)


def test_weight_decay_applies_to_matrices_only():
    model = GPT(MICRO_GPT)
    [optimizer] = configure_optimizers(model, micro_train_config(weight_decay=0.1), torch.device("cpu"))
    by_id = {id(p): name for name, p in model.named_parameters()}  # the tied head is listed once, as wte
    decayed = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {by_id[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    expected = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{layer}.weight"
        for i in range(2)
        for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert decayed == expected
    assert plain == set(by_id.values()) - expected
    assert all(name.endswith(".bias") or ".ln_" in name for name in plain)
    assert optimizer.defaults["fused"]  # the fused CPU kernel is what every engine test runs


HIDDEN_MATRICES = {
    f"transformer.h.{i}.{layer}.weight"
    for i in range(2)
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(MICRO_GPT)
    muon, adamw = configure_optimizers(model, micro_train_config(optimizer="muon"), torch.device("cpu"))
    by_id = {id(p): name for name, p in model.named_parameters()}
    assert isinstance(muon, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert {by_id[id(p)] for g in muon.param_groups for p in g["params"]} == HIDDEN_MATRICES
    rest = {by_id[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert rest == set(by_id.values()) - HIDDEN_MATRICES and "transformer.wte.weight" in rest


def test_muon_is_refused_with_fsdp_when_the_config_loads():
    with pytest.raises(ValueError, match="optimizer muon needs whole matrices"):
        TrainConfig(optimizer="muon", parallel="fsdp")


def test_the_engine_with_muon_matches_a_hand_written_loop_and_resumes_exactly(tmp_path):
    """Three steps with Muon (torch's, orthogonalizing in float32 on the CPU: tests/unit/test_muon.py) on the
    hidden matrices and AdamW on the rest, against plain PyTorch; then the same run resumed from its step-1
    checkpoint ends with the same weights, bit for bit."""
    steps, lr = 3, 1e-2
    config = micro_train_config(max_steps=steps, optimizer="muon", lr=lr, min_lr=lr, warmup_steps=0, grad_clip=0)
    torch.manual_seed(0)
    reference = GPT(MICRO_GPT.model_copy(update={"vocab_multiple": 1, "loss_chunk": 0}))
    engine_model = copy.deepcopy(reference)
    result = train(engine_model, config, RandomBatches(), None, tmp_path / "whole")

    named = dict(reference.named_parameters())
    matrices = [p for name, p in named.items() if name in HIDDEN_MATRICES]
    others = [p for name, p in named.items() if name not in HIDDEN_MATRICES]
    optimizers = [
        Muon(matrices, lr=lr, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW(
            [
                {"params": [p for p in others if p.dim() == 2], "weight_decay": 0.1},
                {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=lr,
            betas=(0.9, 0.95),
        ),
    ]
    batches = iter(RandomBatches())
    for _ in range(steps):
        for inputs, targets in (next(batches), next(batches)):  # 2 micro-batches of 4 x 16 tokens
            (reference(inputs, targets).loss / 2).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    # Last-bit differences in the gradients (the engine's fused loss): AdamW on those matrices, or Muon's
    # update at the scale of Keller Jordan's original instead of AdamW's, would be 1e-2 away.
    for (name, expected), actual in zip(reference.state_dict().items(), engine_model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4, msg=name)

    resumed_dir = tmp_path / "resumed" / "checkpoints"
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step-1", resumed_dir / "step-1")
    resumed = train(GPT(reference.config), config, RandomBatches(), None, tmp_path / "resumed")
    expected = load_model(result.checkpoint).state_dict()
    assert all(
        torch.equal(tensor, expected[name]) for name, tensor in load_model(resumed.checkpoint).state_dict().items()
    )


def test_flops_per_token_matches_a_hand_count():
    # d = 32: per block ln_1 64 + c_attn 3,168 + attn c_proj 1,056 + ln_2 64 + c_fc 4,224 + mlp c_proj 4,128
    # = 12,704; two blocks, wte 64 x 32 = 2,048 (the tied head is the same weights), ln_f 64: 27,520.
    hand = 6 * 27_520 + 12 * 2 * 16 * 32  # 6N + 12 L T d, T = 16
    model = GPT(MICRO_GPT)
    assert sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel() == 27_520
    assert MICRO_GPT.flops_per_token(16) == hand == 177_408


@pytest.mark.parametrize("masked", [False, True])
def test_accumulated_micro_batches_equal_one_batch(masked):
    torch.manual_seed(0)
    inputs = torch.randint(64, (8, 16))
    targets = torch.randint(64, (8, 16))
    if masked:  # uneven: the micro-batches score 16, 20, 14 and 1 of their 32 targets
        targets[0, :] = -100
        targets[2:4, :6] = -100
        targets[4:6, 7:] = -100
        targets[6:8, :] = -100
        targets[7, 3] = 5
    reference = GPT(MICRO_GPT)
    accumulated = GPT(MICRO_GPT)
    accumulated.load_state_dict(reference.state_dict())

    expected_loss = reference(inputs, targets).loss  # the model's own mean over the whole batch
    expected_loss.backward()
    micro_batches = [(inputs[i : i + 2], targets[i : i + 2]) for i in range(0, 8, 2)]
    loss_sum, scored = accumulate_gradients(accumulated, micro_batches, torch.device("cpu"))

    assert scored.item() == (targets != -100).sum().item()
    assert (loss_sum / scored).item() == pytest.approx(expected_loss.item(), rel=1e-5)
    for (name, p), q in zip(reference.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


class MaskedBatches(RandomBatches):
    """RandomBatches whose targets below 16 are not scored: about a quarter, a different
    number in each micro-batch, so that only a loss normalised over the whole step matches."""

    def __iter__(self):
        for inputs, targets in super().__iter__():
            yield inputs, targets.masked_fill(targets < 16, -100)


def test_engine_matches_a_hand_written_training_loop(tmp_path, monkeypatch):
    """Six engine steps against plain PyTorch: 2 micro-batches per step (128 tokens / 4 x 16),
    clipping that clips every step, decay on matrices only, 2 warmup steps then cosine."""
    steps, warmup, lr, min_lr, clip, decay, eval_every, eval_batches = 6, 2, 1e-2, 1e-3, 0.05, 0.5, 3, 2
    config = micro_train_config(
        max_steps=steps,
        warmup_steps=warmup,
        lr=lr,
        min_lr=min_lr,
        grad_clip=clip,
        weight_decay=decay,
        eval_every=eval_every,
        checkpoint_every=0,
    )
    peak = 1e9  # a fixed peak instead of a measured one, so that MFU can be checked
    monkeypatch.setattr("model.train.peak_flops", lambda device, bf16: Peak(peak, "fixed for the test"))
    torch.manual_seed(0)
    # The speed choices off: the head and loss computed as the reference below computes them, so that
    # Adam (which turns float noise in a near-zero gradient into a full step) sees identical gradients.
    # test_padded_vocab and test_loss check that the padded head and the chunked loss change nothing.
    reference = GPT(MICRO_GPT.model_copy(update={"vocab_multiple": 1, "loss_chunk": 0}))
    engine_model = copy.deepcopy(reference)
    logged = {}
    val_batches = list(islice(MaskedBatches(seed=1), eval_batches))
    train(
        engine_model,
        config,
        MaskedBatches(),
        val_batches,
        tmp_path,
        callback=lambda step, metrics: logged.update({step: dict(metrics)}),
    )

    named = dict(reference.named_parameters())  # the tied head is wte, listed once
    matrices = [p for name, p in named.items() if name.endswith(".weight") and ".ln_" not in name]
    vectors = [p for name, p in named.items() if name.endswith(".bias") or ".ln_" in name]
    assert len(matrices) + len(vectors) == len(named)
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": decay}, {"params": vectors, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def summed_cross_entropy(inputs, targets):
        logits = reference(inputs).logits
        return F.cross_entropy(
            logits.view(-1, MICRO_GPT.vocab_size), targets.view(-1), ignore_index=-100, reduction="sum"
        )

    def scored(batches):
        return sum(int((targets != -100).sum()) for _, targets in batches)

    with torch.no_grad():  # the initial weights' loss, validated at step 0 (eval_at_start, on by default)
        initial_nats = sum(summed_cross_entropy(inputs, targets).item() for inputs, targets in val_batches)
    assert logged[0] == pytest.approx({"val_loss": initial_nats / scored(val_batches)}, rel=1e-5)

    train_batches = iter(MaskedBatches())
    scored_per_micro_batch = set()
    for step in range(steps):
        if step < warmup:
            rate = lr * (step + 1) / warmup
        else:  # down to min_lr at the last step
            rate = min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (step + 1 - warmup) / (steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = rate
        micro_batches = [next(train_batches), next(train_batches)]
        targets_in_step = scored(micro_batches)
        scored_per_micro_batch |= {scored([batch]) for batch in micro_batches}
        loss = 0.0
        for inputs, targets in micro_batches:
            micro_loss = summed_cross_entropy(inputs, targets) / targets_in_step
            micro_loss.backward()
            loss += micro_loss.item()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip).item()
        optimizer.step()
        optimizer.zero_grad()

        metrics = logged[step + 1]
        assert norm > 2 * clip, step  # clipping changes every update
        assert metrics["lr"] == pytest.approx(rate, rel=1e-12)
        assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
        assert metrics["mfu"] == pytest.approx(MICRO_GPT.flops_per_token(16) * metrics["tokens_per_s"] / peak)
        assert metrics["tokens_per_s"] > 0 and metrics["memory_mb"] > 0
        if (step + 1) % eval_every:
            assert "val_loss" not in metrics
        else:
            with torch.no_grad():  # MICRO_GPT has no dropout: train and eval mode compute the same
                val_nats = sum(summed_cross_entropy(inputs, targets).item() for inputs, targets in val_batches)
            assert metrics["val_loss"] == pytest.approx(val_nats / scored(val_batches), rel=1e-5)

    assert logged.keys() == set(range(0, steps + 1))
    assert len(scored_per_micro_batch) > 1  # the masking is uneven, as the normalisation needs
    for (name, expected), actual in zip(reference.state_dict().items(), engine_model.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_batch_tokens_must_split_into_micro_batches(tmp_path):
    with pytest.raises(UserError, match=r"batch_tokens \(100\).*4 x 16 x 1 = 64"):
        train(GPT(MICRO_GPT), micro_train_config(batch_tokens=100), RandomBatches(), None, tmp_path)


def test_bf16_autocast_and_fused_adamw_train_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = GPT(MICRO_GPT)
    fp32_model = copy.deepcopy(model)
    dtypes = []
    model.transformer.h[0].mlp.c_fc.register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    losses: dict[str, list[float]] = {"bf16": [], "fp32": []}
    result = train(
        model,
        micro_train_config(bf16=True, max_steps=3),
        RandomBatches(),
        VAL_BATCHES,
        tmp_path / "bf16",
        callback=lambda step, metrics: step and losses["bf16"].append(metrics["loss"]),  # step 0: validation only
    )
    train(
        fp32_model,
        micro_train_config(bf16=False, max_steps=3),
        RandomBatches(),
        VAL_BATCHES,
        tmp_path / "fp32",
        callback=lambda step, metrics: step and losses["fp32"].append(metrics["loss"]),  # step 0: validation only
    )
    assert set(dtypes) == {torch.bfloat16}
    assert load_state(result.checkpoint)["optimizer"]["param_groups"][0]["fused"]
    # The same losses as in fp32 to within bf16 matmuls' rounding (measured: ~2e-4 relative;
    # a loss itself reduced in bf16 would be off by up to 4e-3).
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-3)
    assert losses["bf16"] != losses["fp32"]  # and bf16 did run


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, optimizer):
    """The step is queued whole before the host reads its loss: the optimizers must skip the update
    on the device (fused AdamW's found_inf; Muon's guard puts its matrices back)."""
    model = GPT(MICRO_GPT)
    forwards = []

    def poison_step_3(module, args, output):  # 2 micro-batches per step: forwards 5 and 6 are step 3
        forwards.append(1)
        return output._replace(loss=output.loss * math.nan) if len(forwards) == 5 else output

    model.register_forward_hook(poison_step_3)
    with pytest.raises(NonFiniteLoss, match=r"step 3: the training loss is nan.*checkpoints/step-2"):
        train(model, micro_train_config(max_steps=6, optimizer=optimizer), RandomBatches(), None, tmp_path)
    assert [p.name for p in checkpoint_dirs(tmp_path / "checkpoints")] == ["step-1", "step-2"]
    good = load_model(tmp_path / "checkpoints" / "step-2")
    # The poisoned step changed no weight: the model in memory is step 2's, bit for bit.
    assert all(torch.equal(tensor, good.state_dict()[name]) for name, tensor in model.state_dict().items())
    assert all(torch.isfinite(p).all() for p in good.parameters())
    logits = good(torch.zeros(1, 16, dtype=torch.long)).logits
    assert torch.isfinite(F.log_softmax(logits, -1)).all()
    assert load_state(tmp_path / "checkpoints" / "step-2")["step"] == 2


def test_a_run_resumed_at_max_steps_reports_the_last_steps_figures(tmp_path):
    # A stage killed after its final checkpoint but before recording the result reruns
    # with nothing left to train: it must still report the losses of the run that did.
    losses = []
    finished = train(
        GPT(MICRO_GPT),
        micro_train_config(max_steps=3),
        RandomBatches(),
        VAL_BATCHES,
        tmp_path,
        callback=lambda step, metrics: step and losses.append(metrics["loss"]),  # step 0: validation only
    )
    rerun = train(GPT(MICRO_GPT), micro_train_config(max_steps=3), RandomBatches(), VAL_BATCHES, tmp_path)
    assert rerun.steps == 3 and rerun.tokens == 0
    assert rerun.train_loss == losses[-1] == finished.train_loss
    assert rerun.val_loss == finished.val_loss


def test_validating_the_initial_weights_is_a_step_0_point_that_changes_no_weight(tmp_path):
    # eval_at_start is run-only (left out of the stages' fingerprints): the weights must not depend on it.
    logged: dict[bool, dict[int, set[str]]] = {True: {}, False: {}}
    models = {}
    for on in (True, False):
        torch.manual_seed(0)
        models[on] = GPT(MICRO_GPT)
        train(
            models[on],
            micro_train_config(max_steps=3, eval_every=0, eval_at_start=on),
            RandomBatches(),
            VAL_BATCHES,
            tmp_path / str(on),
            callback=lambda step, metrics, on=on: logged[on].update({step: set(metrics)}),
        )
    assert logged[True][0] == {"val_loss"} and 0 not in logged[False]
    assert {step: names for step, names in logged[True].items() if step} == logged[False]
    for (name, expected), actual in zip(models[False].state_dict().items(), models[True].state_dict().values()):
        assert torch.equal(actual, expected), name
