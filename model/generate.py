"""Autoregressive generation with a key/value cache, and few-shot prompts.

One token per step: the first step runs the prompts through the model and fills the cache
(prefill); each later step runs only the newest token against the cached keys and values.
Prompts of different lengths are left-padded to a common length (see `KVCache`). On a GPU
the matmuls run in bf16 autocast (`model.device.inference_autocast`); the logits stay fp32.

Past the context (block_size) the model sees the last block_size tokens. Positions are
learned, so sliding the window moves every token to a new position and invalidates every
cached key and value past the first layer: the cache is rebuilt from the window at each such
step, which is exactly what a model without a cache computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.device import inference_autocast
from model.errors import UserError
from model.gpt import GPT, KVCache
from model.special_tokens import SpecialIds


@torch.inference_mode()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = 40,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    on_token: Callable[[int, int], None] | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens; return the new tokens only, per prompt.

    temperature=0 is greedy. top_k keeps the k most likely tokens (None or 0: all); top_p
    keeps the smallest set of most likely tokens whose probability reaches p. A sequence
    stops after eos_id (included) when it is given. With a seed, results repeat.
    use_cache=False recomputes the whole window at every step (for comparison).
    on_token(row, token) is called with each new token of an unfinished row as it is drawn (streaming).
    """
    _check_arguments(model, prompts, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    rows = [list(prompt) for prompt in prompts]
    new_tokens: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    cache = None
    try:
        for step in range(max_new_tokens):
            if use_cache and cache is not None and cache.offset < model.config.block_size:
                last = torch.tensor([[row[-1]] for row in rows], device=device)  # (B, 1)
                with inference_autocast(device):
                    logits = model(last, cache=cache, fp32_logits=True).logits[:, -1]  # (B, V)
            else:
                with inference_autocast(device):
                    logits, cache = _prefill(model, rows, device, use_cache, max_new_tokens - step)
            next_tokens = sample(logits, temperature, top_k, top_p, generator).tolist()
            for b, token in enumerate(next_tokens):
                rows[b].append(token)
                if not finished[b]:
                    new_tokens[b].append(token)
                    finished[b] = token == eos_id
                    if on_token is not None:
                        on_token(b, token)
            if all(finished):
                break
    finally:
        model.train(was_training)
    return new_tokens


def _prefill(
    model: GPT, rows: list[list[int]], device: torch.device, use_cache: bool, new_tokens: int
) -> tuple[torch.Tensor, KVCache | None]:
    """Run the last block_size tokens of every row, left-padded to one length, for the next of
    `new_tokens` tokens still to generate.

    Returns the (B, V) next-token logits and a cache filled with the window, or no cache when
    use_cache is off and the rows need no padding (a padded batch keeps one for its pad mask).
    With the cache the rows are padded to `prefill_length`; without it, only to the longest.
    """
    windows = [row[-model.config.block_size :] for row in rows]
    length = max(len(window) for window in windows)
    if use_cache:
        length = prefill_length(length, model.config.block_size, new_tokens)
    pad = torch.tensor([length - len(window) for window in windows])
    # The pad slots are masked out (KVCache's pad), so any id does: each row repeats its own first token.
    idx = torch.tensor([[window[0]] * (length - len(window)) + window for window in windows], device=device)
    cache = None
    if use_cache or pad.any():
        # Under autocast the keys and values come out of the bf16 matmuls: store them as such.
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else next(model.parameters()).dtype
        cache = KVCache(model.config, len(rows), pad=pad, device=device, dtype=dtype)
    return model(idx, cache=cache, fp32_logits=True).logits[:, -1], cache


def prefill_length(longest: int, block_size: int, new_tokens: int) -> int:
    """The length a cached prefill of rows up to `longest` tokens is left-padded to, when
    `new_tokens` tokens are still to be generated: the next power of two from 64, so that
    shape-specialised kernels (compiled flex attention, cuBLAS's choices) see a handful of
    lengths instead of one per prompt; the pad slots are masked out.

    The padding never takes the slots the new tokens need: the prefill gives the first of them,
    and each later one is fed through the cache, so the cache must keep `new_tokens - 1` slots
    free. Padded past that, the cache would be full before the end and every later token would
    rebuild it from the whole window, a full forward pass per token (a prompt of 192 tokens
    padded to a 256-token context: the fine-tuning parse rate's, before this limit)."""
    bucket = max(64, 1 << (longest - 1).bit_length())
    return max(longest, min(bucket, block_size - max(new_tokens - 1, 0)))


def sample(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row from (B, V) logits; returns (B,) token ids."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    # Candidates sorted from most to least likely: the top k, or the whole vocabulary.
    # Drawing among 40 candidates instead of V tokens is also what makes sampling cheap.
    values, candidates = torch.topk(logits, min(top_k or logits.size(-1), logits.size(-1)), dim=-1)
    probs = values.softmax(dim=-1)
    if top_p < 1.0:
        # Drop a candidate when the more likely ones before it already reach top_p: what is
        # left is the smallest set whose probability reaches top_p (never empty).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1); needs no renormalising
    return candidates.gather(-1, choice).squeeze(-1)


def few_shot_prompt(examples: list[tuple[list[int], list[int]]], query: list[int], special: SpecialIds) -> list[int]:
    """Token ids of a GPT-3 style few-shot prompt: `prompt <|sep|> completion <|endoftext|>` per example,
    then `query <|sep|>`, so the model writes the query's completion (and ends it with <|endoftext|>).

    This is the fine-tuning format (prompt, separator, completion, end of text) repeated;
    pass the result to `generate` with eos_id=special.eos.
    """
    tokens: list[int] = []
    for prompt, completion in examples:
        tokens += [*prompt, special.sep, *completion, special.eos]
    return tokens + [*query, special.sep]


def _check_arguments(
    model: GPT, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int | None, top_p: float
) -> None:
    context = model.config.block_size
    if not prompts:
        raise UserError("generate: no prompts given")
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise UserError(f"generate: prompt {i} is empty; a prompt needs at least one token")
        if len(prompt) >= context:
            raise UserError(
                f"generate: prompt {i} has {len(prompt)} tokens but the model's context (block_size) is "
                f"{context}, which leaves no room to generate; shorten it to at most {context - 1} tokens"
            )
    if max_new_tokens < 0:
        raise UserError(f"generate: max_new_tokens is {max_new_tokens}; it must be >= 0")
    if temperature < 0:
        raise UserError(f"generate: temperature is {temperature}; it must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 0:
        raise UserError(f"generate: top_k is {top_k}; it must be >= 0 (0 or None keeps every token)")
    if not 0 < top_p <= 1:
        raise UserError(f"generate: top_p is {top_p}; it must be in (0, 1]")
