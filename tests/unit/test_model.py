"""The GPT module and its config, each checked against a computation written here."""

import math

import pytest
import torch
from pydantic import ValidationError

from model.config import GPTConfig, ModelConfig, preset
from model.errors import UserError
from model.gpt import GPT, banded_block_mask, banded_flex_attention
from support.models import perturbed

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return perturbed(GPT(GPTConfig(**{**TINY, **overrides}))).eval()


# ---- a reference forward pass, written from the papers' equations ----------------------


def allowed(i: int, j: int, kind: str, window: int) -> bool:
    """May query position i attend to key position j? Causal; sparse adds the band i - window < j."""
    return j <= i and (kind == "dense" or j > i - window)


def naive_attention(q, k, v, kind: str, window: int):
    """(nh, T, hs) per head: softmax(q k^T / sqrt(hs)) over the allowed keys, one query at a time."""
    nh, T, hs = q.shape
    out = torch.zeros_like(q)
    for h in range(nh):
        for i in range(T):
            keys = [j for j in range(T) if allowed(i, j, kind, window)]
            scores = torch.stack([q[h, i] @ k[h, j] for j in keys]) / math.sqrt(hs)
            weights = torch.exp(scores - scores.max())
            weights = weights / weights.sum()
            out[h, i] = sum(w * v[h, j] for w, j in zip(weights, keys))
    return out


def layer_norm(x, weight, bias):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight + bias


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    """Logits (T, V) of one sequence, computed from the model's parameters by hand."""
    c = model.config
    p = dict(model.named_parameters())

    def bias(name):  # every Linear and LayerNorm has one exactly when config.bias; a missing one is a KeyError
        return p[name + ".bias"] if c.bias else 0

    def linear(x, name):
        return x @ p[name + ".weight"].T + bias(name)

    def heads(t):  # (T, C) -> (nh, T, hs)
        return t.view(T, c.n_head, c.head_dim).transpose(0, 1)

    T = len(tokens)
    x = p["transformer.wte.weight"][tokens] + p["transformer.wpe.weight"][:T]
    for layer in range(c.n_layer):
        pre = f"transformer.h.{layer}."
        h = layer_norm(x, p[pre + "ln_1.weight"], bias(pre + "ln_1"))
        q, k, v = linear(h, pre + "attn.c_attn").split(c.n_embd, dim=-1)
        kind = c.attention[layer % len(c.attention)]
        y = naive_attention(heads(q), heads(k), heads(v), kind, c.sparse_window).transpose(0, 1).reshape(T, c.n_embd)
        x = x + linear(y, pre + "attn.c_proj")
        h = layer_norm(x, p[pre + "ln_2.weight"], bias(pre + "ln_2"))
        x = x + linear(gelu_tanh(linear(h, pre + "mlp.c_fc")), pre + "mlp.c_proj")
    x = layer_norm(x, p["transformer.ln_f.weight"], bias("transformer.ln_f"))
    return x @ p["transformer.wte.weight"].T


# ---- architecture --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(attention=["dense"]),
        dict(attention=["sparse"], sparse_window=3),
        dict(attention=["dense", "sparse"], sparse_window=1),
        dict(attention=["sparse", "dense"], sparse_window=5, bias=False),
        dict(attention=["sparse"], sparse_window=10),  # the last query alone loses a key, the first
    ],
    ids=["dense", "sparse-w3", "dense-sparse-w1", "sparse-dense-w5-nobias", "sparse-w10"],
)
@torch.no_grad()
def test_forward_equals_hand_written_attention(overrides):
    model = tiny_model(**overrides)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 11))
    logits = model(tokens).logits
    assert logits.shape == (2, 11, TINY["vocab_size"])
    for row in range(2):
        torch.testing.assert_close(logits[row], reference_logits(model, tokens[row].tolist()), atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_band_equals_hand_written_band():
    # The kernel path sparse layers take on CUDA, run here eagerly on the CPU.
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 20, 8).unbind(0)
    for window in (1, 4, 19, 20):
        expected = naive_attention(q[0], k[0], v[0], "sparse", window)
        actual = banded_flex_attention(q, k, v, banded_block_mask(20, window, "cpu"))[0]
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", [["dense"], ["sparse"], ["dense", "sparse"]])
@torch.no_grad()
def test_causality(attention):
    model = tiny_model(attention=attention, sparse_window=3)
    tokens = torch.randint(0, TINY["vocab_size"], (1, 16))
    logits = model(tokens).logits
    for t in (0, 5, 14):
        changed = tokens.clone()
        changed[0, t + 1 :] = (changed[0, t + 1 :] + 1) % TINY["vocab_size"]
        after = model(changed).logits
        torch.testing.assert_close(after[:, : t + 1], logits[:, : t + 1], atol=0, rtol=0)
        assert not torch.allclose(after[:, t + 1 :], logits[:, t + 1 :])  # the change does reach later positions


@pytest.mark.parametrize("window", [1, 4, 15, 16])
@torch.no_grad()
def test_sparse_layer_sees_exactly_its_band(window):
    # With a single layer, the logits at position i depend on the token at j exactly when i may
    # attend to j: i - window < j <= i, both edges included, written out in the assert.
    model = tiny_model(n_layer=1, attention=["sparse"], sparse_window=window)
    T = TINY["block_size"]
    tokens = torch.randint(0, TINY["vocab_size"], (1, T))
    logits = model(tokens).logits[0]
    for j in range(T):
        changed = tokens.clone()
        changed[0, j] = (changed[0, j] + 1) % TINY["vocab_size"]
        moved = (model(changed).logits[0] != logits).any(dim=-1)  # (T,) positions whose logits changed
        assert moved.tolist() == [i - window < j <= i for i in range(T)], f"token {j}"


def test_head_is_the_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=128))
    for projection in ("attn.c_proj", "mlp.c_proj"):  # the two writes into the residual stream per block
        weights = torch.cat([block.get_submodule(projection).weight.flatten() for block in model.transformer.h])
        assert weights.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05), projection
    for weights in (
        model.transformer.h[0].attn.c_attn.weight,
        model.transformer.h[0].mlp.c_fc.weight,
        model.transformer.wte.weight,
        model.transformer.wpe.weight,
    ):
        assert weights.std().item() == pytest.approx(0.02, rel=0.05)


def test_loss_at_initialisation_is_log_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32))
    tokens = torch.randint(0, 512, (8, 32))
    targets = torch.randint(0, 512, (8, 32))
    assert model(tokens, targets).loss.item() == pytest.approx(math.log(512), abs=0.05)


@torch.no_grad()
def test_loss_ignores_minus_100_targets():
    model = tiny_model()
    tokens = torch.randint(0, 64, (2, 8))
    targets = torch.randint(0, 64, (2, 8))
    targets[0, :3] = -100
    targets[1, 5] = -100
    output = model(tokens, targets)
    log_probs = model(tokens).logits.log_softmax(-1)  # the whole logits, scored by hand
    kept = [-log_probs[b, t, targets[b, t]] for b in range(2) for t in range(8) if targets[b, t] != -100]
    assert output.loss.item() == pytest.approx(torch.stack(kept).mean().item(), rel=1e-5)
    assert output.cache is None
    assert model(tokens).loss is None


def test_tiny_model_overfits_one_batch():
    model = tiny_model().train()
    tokens = torch.randint(0, 64, (2, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(tokens[:, :-1], tokens[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_input_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


# ---- parameter counts ------------------------------------------------------------------------


def count_by_hand(vocab, context, layers, width, bias=True):
    """Embeddings (tokens, positions; the head reuses the token matrix), then per block:
    two LayerNorms, q/k/v and output projections, the 4x MLP; then the final LayerNorm."""
    b = 1 if bias else 0
    ln = width * (1 + b)
    qkv = width * 3 * width + b * 3 * width
    attn_out = width * width + b * width
    fc = width * 4 * width + b * 4 * width
    mlp_out = 4 * width * width + b * width
    return vocab * width + context * width + layers * (2 * ln + qkv + attn_out + fc + mlp_out) + ln


def test_gpt2_small_has_124_439_808_parameters():
    assert count_by_hand(50257, 1024, 12, 768) == 124_439_808
    assert preset("gpt2-small").num_params() == 124_439_808


def test_gpt3_175b_is_within_one_percent_of_175_billion():
    c = preset("gpt3-175b")
    assert (c.n_layer, c.n_embd, c.block_size) == (96, 12288, 2048)
    assert c.num_params() == count_by_hand(50257, 2048, 96, 12288)
    assert abs(c.num_params() - 175e9) / 175e9 < 0.01


@pytest.mark.parametrize("bias", [True, False])
def test_num_params_counts_the_module(bias):
    model = tiny_model(bias=bias, attention=["dense", "sparse"])
    assert model.config.num_params() == sum(p.numel() for p in model.parameters())  # tied head listed once
    assert model.config.num_params() == count_by_hand(64, 16, 2, 32, bias)


def test_flops_per_token():
    c = GPTConfig(**TINY)
    n_without_positions = count_by_hand(64, 16, 2, 32) - 16 * 32
    assert c.flops_per_token(16) == 6 * n_without_positions + 12 * 2 * 16 * 32


# (n_layer, n_head, n_embd) of the released GPT-2 models and of GPT-3's table 2.1
PUBLISHED_SHAPES = {
    "gpt2-small": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    "gpt3-small": (12, 12, 768),
    "gpt3-medium": (24, 16, 1024),
    "gpt3-large": (24, 16, 1536),
    "gpt3-xl": (24, 16, 2048),  # the table's 24 heads of 128 do not make 2,048; its head size is kept
    "gpt3-2.7b": (32, 32, 2560),
    "gpt3-6.7b": (32, 32, 4096),
    "gpt3-13b": (40, 40, 5120),  # the table's 5,140 is not divisible by its 40 heads
    "gpt3-175b": (96, 96, 12288),
}
GPT3_BILLIONS = {
    "gpt3-small": 0.125,
    "gpt3-medium": 0.350,
    "gpt3-large": 0.760,
    "gpt3-xl": 1.3,
    "gpt3-2.7b": 2.7,
    "gpt3-6.7b": 6.7,
    "gpt3-13b": 13.0,
    "gpt3-175b": 175.0,
}


@pytest.mark.parametrize("name", PUBLISHED_SHAPES)
def test_presets_have_the_published_shapes(name):
    c = preset(name)
    assert (c.n_layer, c.n_head, c.n_embd) == PUBLISHED_SHAPES[name]
    if name.startswith("gpt2"):
        assert (c.vocab_size, c.block_size, c.attention) == (50257, 1024, ["dense"])
    else:
        assert (c.vocab_size, c.block_size, c.attention) == (50257, 2048, ["dense", "sparse"])
        # within 5% of the size the paper gives
        assert c.num_params() == pytest.approx(GPT3_BILLIONS[name] * 1e9, rel=0.05)


def test_tiny_preset():
    tiny = preset("tiny")
    assert (tiny.n_layer, tiny.n_head, tiny.n_embd, tiny.block_size, tiny.attention) == (4, 4, 256, 256, ["dense"])


# ---- bad configs fail with a clear message ----------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_embd=30, n_head=4), r"n_embd \(30\) must be divisible by n_head \(4\)"),
        (dict(sparse_window=0), r"sparse_window[\s\S]*at least its own position"),
        (dict(attention=[]), r"attention[\s\S]*at least one layer kind"),
        (dict(attention=["dense", "banded"]), r"attention[\s\S]*entry 1 is 'banded'"),
        (dict(n_layer=0), r"n_layer"),
    ],
)
def test_bad_config_is_refused_clearly(overrides, message):
    with pytest.raises(ValidationError, match=message):
        GPTConfig(**{**TINY, **overrides})


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match=r"unknown model preset 'gpt4'.*gpt2-small.*gpt3-175b"):
        preset("gpt4")


def test_model_section_resolves_preset_then_overrides():
    section = ModelConfig(preset="gpt2-small", n_layer=2, attention=["dense", "sparse"])
    config = section.resolve(vocab_size=8192)
    assert (config.vocab_size, config.n_layer, config.n_embd, config.attention) == (8192, 2, 768, ["dense", "sparse"])
    assert ModelConfig().resolve(100).n_embd == preset("tiny").n_embd


@pytest.mark.parametrize(
    "section, message",
    [
        (dict(preset="gpt5"), "unknown preset 'gpt5'"),
        (dict(n_head=5), r"n_embd \(256\) must be divisible by n_head \(5\)"),
        (dict(preset=None, n_layer=2), "block_size"),
        (dict(n_layers=2), "n_layers"),
    ],
)
def test_model_section_fails_at_load_time(section, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**section)
