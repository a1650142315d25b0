"""Hugging Face GPT-2 format: write a `GPT` as a `GPT2LMHeadModel` directory, and read one back.

The directory is `config.json` plus `model.safetensors`, which `transformers` loads as-is
(`GPT2LMHeadModel.from_pretrained(directory)`); `transformers` itself is not needed here.
The parameter names are already GPT-2's; the one difference is that GPT-2 stores its
linear layers as `Conv1D`, whose weight is the transpose of `nn.Linear`'s. The output head
is tied to the token embedding, so it is not stored (`tie_word_embeddings`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import GPTConfig
from model.errors import UserError
from model.gpt import GPT
from model.special_tokens import SpecialIds

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh GELU that `MLP` uses


def export_hf(model: GPT, directory: Path | str, special: SpecialIds) -> Path:
    """Write `model` as a Hugging Face GPT2LMHeadModel directory; returns the directory.
    `special`: the ids of its tokenizer's special tokens, for config.json's bos/eos."""
    config = model.config
    if config.has_sparse_layers:
        raise UserError(
            f"cannot export a model with sparse attention layers (attention={config.attention}) "
            "as GPT-2: GPT2LMHeadModel has only dense attention"
        )
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        tensors[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).detach().float().contiguous().cpu()
    # GPT-2 always has biases; a model without them is the same function with zero biases.
    with torch.device("meta"):
        gpt2_shapes = GPT(config.model_copy(update={"bias": True})).state_dict()
    for name, tensor in gpt2_shapes.items():
        if name not in tensors and name != "lm_head.weight":
            tensors[name] = torch.zeros(tensor.shape)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(_hf_config(config, special), indent=2) + "\n")
    return directory


def import_hf(directory: Path | str) -> GPT:
    """Load a Hugging Face GPT-2 directory (config.json + model.safetensors) as a `GPT`."""
    directory = Path(directory)
    config = _gpt_config(_read_hf_config(directory / "config.json"), directory / "config.json")
    weights_path = directory / "model.safetensors"
    try:
        tensors = load_file(weights_path)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{weights_path}: cannot read GPT-2 weights ({e})") from None

    state = {}
    for name, tensor in tensors.items():
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # the original GPT-2 checkpoints are saved without the prefix
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        state[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    wte = state.get("transformer.wte.weight")
    head = state.setdefault("lm_head.weight", wte)
    if wte is not None and not torch.equal(head, wte):
        raise UserError(f"{weights_path}: lm_head.weight differs from the token embedding; only tied heads load")

    model = GPT(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{weights_path}: weights do not match {directory / 'config.json'}: {e}") from None
    return model


def grow_vocabulary(model: GPT, vocab_size: int, new_ids: list[int]) -> GPT:
    """`model` with a token embedding (and the head tied to it) of `vocab_size` rows: the rows
    of `new_ids` (tokens added to its tokenizer, e.g. <|pad|> and <|sep|>) set to the mean of
    the rows that were trained, so a new token starts as an average token rather than noise
    whose logits could dominate. Every other weight, and every other logit, is unchanged."""
    old = model.transformer.wte.weight.detach()  # (V_old, C)
    added = set(new_ids)
    trained = [i for i in range(old.size(0)) if i not in added]
    grown = GPT(model.config.model_copy(update={"vocab_size": max(vocab_size, old.size(0))}))
    state = model.state_dict()
    wte = torch.empty(grown.config.vocab_size, old.size(1), dtype=old.dtype)  # (V, C)
    wte[: old.size(0)] = old
    wte[new_ids] = old[trained].mean(dim=0)
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte
    grown.load_state_dict(state)
    return grown


def _hf_config(config: GPTConfig, special: SpecialIds) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": special.eos,  # GPT-2 starts and ends documents with the same token
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "dtype": "float32",
    }


def _read_hf_config(path: Path) -> dict:
    try:
        hf = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not found; expected a Hugging Face GPT-2 directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{path}: expected a JSON object")
    return hf


def _gpt_config(hf: dict, path: Path) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json; refuses the variants `GPT` does not compute."""
    differences = {
        "model_type": (hf.get("model_type"), "gpt2"),
        "activation_function": (hf.get("activation_function", "gelu_new"), GPT2_ACTIVATIONS),
        "n_inner": (hf.get("n_inner"), (None, 4 * hf.get("n_embd", 0))),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), 1e-5),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), True),
    }
    for field, (value, supported) in differences.items():
        if value not in (supported if isinstance(supported, tuple) else (supported,)):
            raise UserError(f"{path}: {field}={value!r} is not supported (expected {supported!r})")
    try:
        return GPTConfig(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=hf.get("resid_pdrop", 0.0),
        )
    except KeyError as e:
        raise UserError(f"{path}: missing field {e}") from None
    except ValueError as e:  # pydantic's ValidationError, naming the field
        raise UserError(f"{path}: {e}") from None
