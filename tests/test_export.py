"""Hugging Face GPT-2 import and export, checked against `transformers` itself (no download)."""

import json

import pytest
import torch

from model.config import GPTConfig
from model.errors import UserError
from model.export import export_hf, import_hf
from model.gpt import GPT

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


@pytest.mark.parametrize("bias", [True, False])
@torch.no_grad()
def test_exported_model_loads_in_transformers_with_equal_logits(tmp_path, bias):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, bias=bias)).eval()
    export_hf(model, tmp_path)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(hf_model(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_transformers_model_imports_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_layer=2, n_head=2, n_embd=32)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # GPT-2's init zeroes biases and sets LayerNorms to 1; make every weight matter
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_model.save_pretrained(tmp_path)
    model = import_hf(tmp_path).eval()
    assert model.config.attention == ["dense"] and model.config.block_size == 16
    tokens = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(model(tokens).logits, hf_model(tokens).logits, atol=1e-5, rtol=1e-4)


def test_round_trip_keeps_every_weight(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG))
    restored = import_hf(export_hf(model, tmp_path))
    assert restored.config == model.config
    for (name, expected), (_, actual) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(actual, expected), name


def test_sparse_model_refuses_export(tmp_path):
    model = GPT(GPTConfig(**CONFIG, attention=["dense", "sparse"]))
    with pytest.raises(UserError, match="sparse attention layers"):
        export_hf(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_import_refuses_what_gpt_does_not_compute(tmp_path):
    export_hf(GPT(GPTConfig(**CONFIG)), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation_function='relu' is not supported"):
        import_hf(tmp_path)
    with pytest.raises(UserError, match="config.json: not found"):
        import_hf(tmp_path / "missing")
