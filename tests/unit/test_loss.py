"""The chunked linear + cross-entropy against F.cross_entropy over whole logits, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from model.config import GPTConfig
from model.gpt import GPT
from model.loss import linear_cross_entropy
from support.models import perturbed


def reference(hidden, weight, targets, vocab_size):
    """Whole logits, padded columns cut off, torch's own cross-entropy summed."""
    logits = (hidden @ weight.t())[:, :vocab_size]
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])  # one row, uneven chunks, all rows in one
def test_value_and_gradients_equal_cross_entropy_with_ignored_targets(chunk):
    torch.manual_seed(0)
    vocab_size, padded = 300, 384
    hidden = torch.randn(64, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(padded, 16, dtype=torch.float64)
    weight[vocab_size:] = 0  # the model's padding rows
    weight.requires_grad_()
    targets = torch.randint(vocab_size, (64,))
    targets[:5] = -100
    targets[40] = -100

    loss = linear_cross_entropy(hidden, weight, targets, vocab_size, chunk)
    (2.5 * loss).backward()  # a scale on the way back, as the engine's 1/scored
    grads = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    expected = reference(hidden, weight, targets, vocab_size)
    (2.5 * expected).backward()

    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    torch.testing.assert_close(grads[1], weight.grad)
    assert grads[1][vocab_size:].abs().max() == 0  # padded rows get no gradient
    assert grads[0][:5].abs().max() == 0  # ignored positions neither


def test_without_autograd_only_the_value():
    torch.manual_seed(1)
    hidden, weight = torch.randn(10, 8), torch.randn(40, 8)
    targets = torch.randint(33, (10,))
    targets[3] = -100
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, 33, 4)
    torch.testing.assert_close(loss, reference(hidden, weight, targets, 33))
    assert loss.grad_fn is None


def test_bf16_autocast_stays_close_to_fp32():
    """Matmuls in bf16, softmax in fp32: the loss within bf16's rounding of the logits."""
    torch.manual_seed(2)
    hidden = torch.randn(32, 16, requires_grad=True)
    weight = torch.randn(128, 16, requires_grad=True)
    targets = torch.randint(100, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, 100, 8)
    loss.backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    expected = reference(hidden.detach(), weight.detach(), targets, 100)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-2)


@pytest.mark.parametrize("loss_chunk", [0, 16])  # whole logits, and the chunked head + loss
def test_fp32_logits_keeps_the_loss_head_in_fp32_under_bf16_autocast(loss_chunk):
    """GPT.forward(fp32_logits=True) with targets: the loss of the fp32 logits it returns without targets."""
    torch.manual_seed(3)
    model = perturbed(
        GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, loss_chunk=loss_chunk))
    )
    tokens = torch.randint(300, (2, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(inputs, fp32_logits=True).logits  # (B, T, V), the head alone in fp32
        loss = model(inputs, targets, fp32_logits=True, reduction="sum").loss
    assert logits.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
