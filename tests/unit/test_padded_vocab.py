"""The vocabulary padded to a multiple of 128 in the training head changes nothing but speed: the
same loss, gradients, generations, checkpoints and export as the unpadded model, and checkpoints
written before the padding existed still load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import CONFIG, load_model, save_checkpoint
from model.config import GPTConfig
from model.export import export_hf
from model.generate import generate
from model.gpt import GPT
from model.special_tokens import SpecialIds
from support.models import perturbed

# 300 is not a multiple of 128: padded to 384 inside the head
CONFIG_300 = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)


def twin_models(**speed_choices) -> tuple[GPT, GPT]:
    """(padded, unpadded) models from the same seed, perturbed alike."""
    models = []
    for multiple in (128, 1):
        torch.manual_seed(0)
        models.append(perturbed(GPT(CONFIG_300.model_copy(update={"vocab_multiple": multiple, **speed_choices}))))
    return models[0], models[1]


def test_padding_is_inside_the_head_only():
    padded, unpadded = twin_models()
    assert padded.config.padded_vocab_size == 384 and unpadded.config.padded_vocab_size == 300
    assert padded.transformer.wte.weight.shape == (300, 32)  # stored and counted unpadded
    assert sum(p.numel() for p in padded.parameters()) == padded.config.num_params()
    for (name, a), b in zip(padded.state_dict().items(), unpadded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("loss_chunk", [0, 16])  # whole logits, and the chunked head + loss
def test_same_loss_and_gradients(loss_chunk):
    padded, unpadded = twin_models(loss_chunk=loss_chunk)
    tokens = torch.randint(300, (3, 32))
    targets = torch.randint(300, (3, 32))
    targets[0, :4] = -100
    losses = []
    for model in (padded, unpadded):
        loss = model(tokens, targets).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(padded.named_parameters(), unpadded.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    logits = unpadded(tokens).logits  # the whole logits, scored by hand
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(losses[0], expected)


def test_same_generations():
    padded, unpadded = twin_models()
    prompts = [[5, 6, 7], [8]]
    for kwargs in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        assert generate(padded, prompts, 12, **kwargs) == generate(unpadded, prompts, 12, **kwargs)
    assert padded(torch.tensor([prompts[0]])).logits.shape == (1, 3, 300)  # no padded logit to sample


SPECIAL = SpecialIds(eos=0, pad=1, sep=2)


def test_same_hf_export(tmp_path):
    padded, unpadded = twin_models()
    files = [
        load_file(export_hf(model, tmp_path / name, SPECIAL) / "model.safetensors")
        for name, model in (("padded", padded), ("unpadded", unpadded))
    ]
    assert files[0].keys() == files[1].keys()
    for name in files[0]:
        assert torch.equal(files[0][name], files[1][name]), name
    assert json.loads((tmp_path / "padded" / "config.json").read_text())["vocab_size"] == 300


def test_a_checkpoint_from_before_the_padding_loads(tmp_path):
    """Its config.json has no vocab_multiple or loss_chunk: it loads with the defaults, rows as stored."""
    _, old = twin_models()
    checkpoint = save_checkpoint(tmp_path, 1, old, {}, keep=1)
    config = json.loads((checkpoint / CONFIG).read_text())
    for field in ("vocab_multiple", "loss_chunk"):
        del config[field]
    (checkpoint / CONFIG).write_text(json.dumps(config))

    loaded = load_model(checkpoint)
    assert loaded.config.padded_vocab_size == 384
    tokens = torch.randint(300, (2, 32))
    torch.testing.assert_close(loaded(tokens).logits, old(tokens).logits, rtol=0, atol=0)
