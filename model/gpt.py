"""The GPT-2 / GPT-3 decoder-only transformer, in one file.

References:
1) GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"
2) GPT-3: Brown et al. 2020, "Language Models are Few-Shot Learners" (section 2.1: "alternating
   dense and locally banded sparse attention patterns in the layers of the transformer")
3) nanoGPT's model.py, whose layout and names (which are also Hugging Face's GPT-2 names) this follows.

Shapes in comments: B batch, T new tokens, S keys seen (cached + new), C n_embd,
nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from model.config import GPTConfig
from model.loss import linear_cross_entropy
from model.scoring import IGNORE


class KVCache:
    """Every layer's keys and values for the tokens seen so far, preallocated to the context length.

    Slot s of row b holds the token at position s - pad[b]: prompts of different lengths are
    left-padded so that all rows write their next token to the same slot, and the pad slots
    are masked out of attention. `offset` is the number of slots filled. The model fills it
    in place: `GPT.forward(idx, cache=cache)` writes slots offset..offset+T-1 and advances it.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        pad: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, config.n_head, config.block_size, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device) if pad is None else pad.to(device)
        self.padded = bool(self.pad.any())
        self.offset = 0

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, nh, T, hs) keys and values; return all of them so far, (B, nh, S, hs)."""
        end = self.offset + k.size(2)
        self.keys[layer][:, :, self.offset : end] = k
        self.values[layer][:, :, self.offset : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class GPTOutput(NamedTuple):
    logits: torch.Tensor | None  # (B, T, V), for every position; None with targets when loss_chunk fuses the head
    loss: torch.Tensor | None  # cross-entropy over targets != -100 (mean or sum); None without targets
    cache: KVCache | None  # the cache passed in, advanced by T; None without one


# What a layer needs to know about which keys a query may see. `mask` is a boolean
# (B or 1, 1, T, S) tensor (True = attend), a flex-attention BlockMask, or None; with None,
# `is_causal` says whether the usual causal mask applies (SDPA then builds none) or all keys do.
class AttentionMask(NamedTuple):
    mask: torch.Tensor | BlockMask | None
    is_causal: bool


def banded_block_mask(seq_len: int, window: int, device: torch.device | str) -> BlockMask:
    """The sparse band i - window < j <= i as a BlockMask: flex attention skips the blocks outside it."""

    def in_band(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    return create_block_mask(in_band, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=str(device))


# Uncompiled, flex attention materialises the full score matrix. Compiled for fixed shapes (generation
# buckets its prefill lengths, model.generate, so that a few shapes cover every prompt), on first use:
# torch.compile imports the compiler stack, which a process that never runs flex attention should not pay for.
_compiled_flex_attention = None


def banded_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """Attention inside the band only: flex attention skips the key blocks the block mask leaves out.

    Inside a compiled model the model's own compilation covers it; eager on the CPU (tests)."""
    global _compiled_flex_attention
    if not q.is_cuda or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: AttentionMask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.store(layer, k, v)  # (B, nh, S, hs)
        if isinstance(mask.mask, BlockMask):
            y = banded_flex_attention(q, k, v, mask.mask)
        else:
            dropout = self.attn_dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask.mask, dropout_p=dropout, is_causal=mask.is_causal
            )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU, so its published weights load exactly
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attention(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.kind = config.layer_kind(layer)
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, masks: dict[str, AttentionMask], cache: KVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), masks[self.kind], cache, self.layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + position embeddings, n_layer blocks, a final LayerNorm, and the tied output head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one Parameter, read by both
        self._band_masks: dict[tuple[int, str], BlockMask] = {}  # see band_mask
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(N),
        # N = 2 * n_layer residual additions, so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def band_mask(self, seq_len: int, device: torch.device) -> BlockMask:
        """The sparse layers' BlockMask for `seq_len` queries from slot 0, built on first use and kept.

        Call it before running a compiled model (model.train does): the forward then reads a
        mask built outside the graph, instead of building one inside it."""
        key = (seq_len, str(device))
        if key not in self._band_masks:
            self._band_masks[key] = banded_block_mask(seq_len, self.config.sparse_window, device)
        return self._band_masks[key]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        fp32_logits: bool = False,
        reduction: Literal["mean", "sum"] = "mean",
    ) -> GPTOutput:
        """idx (B, T) token ids; targets (B, T) next-token ids, -100 where no loss is wanted.

        With a cache, idx continues the tokens already in it: their keys and values are read
        from it, and this call's are added to it.

        The output head, two choices:
        - `fp32_logits` computes the head in fp32 even under bf16 autocast (evaluation and
          generation: a bf16 logit is off by up to 2^-9 of its size, which moves the loss);
          training keeps the head's matmuls in autocast. The softmax of the loss is fp32 either way.
        - `reduction`: with targets, the loss is the mean or the sum of the cross-entropy over
          the scored targets (training sums, to weigh every token of an accumulated step alike).
        With targets and `config.loss_chunk`, the logits are None: they never exist whole (model.loss).
        """
        T = idx.size(1)
        start = cache.offset if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"{start + T} positions exceed the context of {self.config.block_size} (block_size); "
                "crop the input or rebuild the cache from the last block_size tokens"
            )
        slots = torch.arange(start, start + T, device=idx.device)  # (T,)
        if cache is not None and cache.padded:
            positions = (slots - cache.pad[:, None]).clamp(min=0)  # (B, T); pad slots reuse position 0
        else:
            positions = slots
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        masks = self._attention_masks(T, start, cache, idx.device)
        for block in self.transformer.h:
            x = block(x, masks, cache)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.offset += T
        if not fp32_logits:
            return self._head(x, targets, reduction, cache)
        with torch.autocast(idx.device.type, enabled=False):
            return self._head(x.float(), targets, reduction, cache)

    def _head(self, x: torch.Tensor, targets: torch.Tensor | None, reduction: str, cache: KVCache | None) -> GPTOutput:
        """The logits for x (B, T, C), or with targets (B, T) the loss (and the logits unless chunked)."""
        if targets is None:
            return GPTOutput(self.lm_head(x), None, cache)  # (B, T, V): the unpadded head, nothing to slice
        return self._loss(x, targets, reduction, cache)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str, cache: KVCache | None) -> GPTOutput:
        """The cross-entropy of the head's logits for x (B, T, C) against targets (B, T)."""
        config = self.config
        # Zero rows pad the head to padded_vocab_size: the matmuls get tensor-core friendly shapes
        # (50,257 is odd), and the padded logits are sliced off before the softmax. The stored
        # parameter keeps vocab_size rows, so checkpoints, exports and num_params are unchanged.
        weight = self.lm_head.weight  # (V, C)
        if config.padded_vocab_size > config.vocab_size:
            weight = F.pad(weight, (0, 0, 0, config.padded_vocab_size - config.vocab_size))  # (Vp, C)
        hidden, flat_targets = x.flatten(0, 1), targets.flatten()  # (B*T, C), (B*T,)
        logits = None
        if config.loss_chunk:
            loss = linear_cross_entropy(hidden, weight, flat_targets, config.vocab_size, config.loss_chunk)
        else:
            logits = F.linear(x, weight)[..., : config.vocab_size]  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), flat_targets, ignore_index=IGNORE, reduction="sum")
        if reduction == "mean":
            loss = loss / (flat_targets != IGNORE).sum()
        return GPTOutput(logits, loss, cache)

    def _attention_masks(
        self, T: int, start: int, cache: KVCache | None, device: torch.device
    ) -> dict[str, AttentionMask]:
        """For each layer kind, which keys each of the T queries (slots start..start+T-1) may attend to.

        Query i sees key j when j <= i (causal), j > i - sparse_window in sparse layers, and j
        is not a pad slot. SDPA's own causal flag or no mask at all is used where they suffice,
        and sparse layers on CUDA use flex attention's block mask instead of a T x S tensor.
        """
        S = start + T
        window = self.config.sparse_window
        padded = cache is not None and cache.padded
        masks = {}
        for kind in set(self.config.attention):
            band_matters = kind == "sparse" and S > window
            if not padded and not band_matters and (start == 0 or T == 1):
                # SDPA needs no mask tensor: causal from the start, or one query that sees every key
                masks[kind] = AttentionMask(None, is_causal=start == 0 and T > 1)
            elif band_matters and not padded and start == 0 and device.type == "cuda" and not self._attention_dropout:
                masks[kind] = AttentionMask(self.band_mask(T, device), False)
            else:
                masks[kind] = AttentionMask(self._mask_tensor(T, start, kind, cache, device), False)
        return masks

    @property
    def _attention_dropout(self) -> bool:
        return self.training and self.config.dropout > 0  # flex attention has no dropout

    def _mask_tensor(self, T: int, start: int, kind: str, cache: KVCache | None, device: torch.device) -> torch.Tensor:
        query = torch.arange(start, start + T, device=device)[:, None]  # (T, 1) slots
        key = torch.arange(start + T, device=device)[None, :]  # (1, S) slots
        allowed = key <= query
        if kind == "sparse":
            allowed = allowed & (key > query - self.config.sparse_window)
        if cache is not None and cache.padded:
            pad = cache.pad[:, None, None]  # (B, 1, 1)
            # A pad query attends to the pad keys before it, so its softmax has something to
            # normalise; its output is never used.
            allowed = allowed & ((key >= pad) | (query < pad))  # (B, T, S)
            return allowed[:, None]  # (B, 1, T, S)
        return allowed[None, None]  # (1, 1, T, S)
