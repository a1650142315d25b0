"""Hugging Face GPT-2 import and export, checked against `transformers` itself (no download)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import GPTConfig
from model.errors import UserError
from model.export import export_hf, import_hf
from model.gpt import GPT
from model.special_tokens import SpecialIds
from support.models import perturbed

transformers = pytest.importorskip("transformers")

SPECIAL = SpecialIds(eos=61, pad=62, sep=63)  # the last ids, as a pretrained tokenizer places them
CONFIG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_exported_model_loads_in_transformers_with_equal_logits(tmp_path, bias):
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**CONFIG, bias=bias))).eval()
    export_hf(model, tmp_path, SPECIAL)
    hf_model, loading = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    for report in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert list(loading[report]) == [], report  # every weight came from the file, none left at init
    hf_model.eval()
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(hf_model(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-4)


def saved_transformers_model(directory):
    """A GPT2LMHeadModel with every weight perturbed (its init has LayerNorms at 1, biases at 0),
    saved by transformers."""
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_layer=2, n_head=2, n_embd=32)
    hf_model = perturbed(transformers.GPT2LMHeadModel(hf_config)).eval()
    hf_model.save_pretrained(directory)
    return hf_model


@torch.no_grad()
def test_transformers_model_imports_with_equal_logits(tmp_path):
    hf_model = saved_transformers_model(tmp_path)
    model = import_hf(tmp_path).eval()
    assert model.config.attention == ["dense"] and model.config.block_size == 16
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(tokens).logits, hf_model(tokens).logits, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_original_gpt2_layout_imports(tmp_path):
    # The published GPT-2 checkpoints name weights without the `transformer.` prefix and carry
    # each layer's causal-mask buffers (`attn.bias`, `attn.masked_bias`).
    saved, original = tmp_path / "saved", tmp_path / "original"
    hf_model = saved_transformers_model(saved)
    weights = {
        name.removeprefix("transformer."): tensor
        for name, tensor in load_file(saved / "model.safetensors").items()
        if name != "lm_head.weight"
    }
    for layer in range(2):
        weights[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        weights[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    original.mkdir()
    save_file(weights, original / "model.safetensors")
    (original / "config.json").write_text((saved / "config.json").read_text())
    model = import_hf(original).eval()
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(tokens).logits, hf_model(tokens).logits, atol=1e-5, rtol=1e-4)


def test_round_trip_keeps_every_weight(tmp_path):
    torch.manual_seed(0)
    model = perturbed(GPT(GPTConfig(**CONFIG)))
    restored = import_hf(export_hf(model, tmp_path, SPECIAL))
    assert restored.config == model.config
    restored_state = restored.state_dict()
    assert restored_state.keys() == model.state_dict().keys()
    for name, expected in model.state_dict().items():
        assert torch.equal(restored_state[name], expected), name


def test_sparse_model_refuses_export(tmp_path):
    model = GPT(GPTConfig(**CONFIG, attention=["dense", "sparse"]))
    with pytest.raises(UserError, match="sparse attention layers"):
        export_hf(model, tmp_path, SPECIAL)
    assert not (tmp_path / "model.safetensors").exists()


def test_import_refuses_what_gpt_does_not_compute(tmp_path):
    export_hf(GPT(GPTConfig(**CONFIG)), tmp_path, SPECIAL)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation_function='relu' is not supported"):
        import_hf(tmp_path)
    with pytest.raises(UserError, match="config.json: not found"):
        import_hf(tmp_path / "missing")
