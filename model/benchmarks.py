"""Log-likelihood of a continuation given a context: how downstream benchmarks score a model.

Each request is (context ids, continuation ids). The model reads the context then the
continuation, and the continuation's tokens are scored: their log-probabilities summed, and
whether each was the model's top-1 prediction (greedy). This is lm-evaluation-harness's
`loglikelihood` request; multiple-choice and cloze benchmarks are built from it
(tasks/evaluate_benchmarks.py).

Text becomes a request as lm-eval splits it (`encode_request`): context and context +
continuation are encoded whole, and the continuation's tokens are those past the context's
encoding; trailing spaces of the context move to the continuation.

A request longer than the context window keeps its last `block_size + 1` tokens, as
lm-eval does: the context is cut from the left, the continuation (which must fit) stays whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.device import inference_autocast
from model.errors import UserError
from model.prompts import Encode

Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class Continuation:
    logprob: float  # summed log-probability of the continuation's tokens, natural log
    greedy: bool  # every continuation token was the model's top-1 prediction
    truncated: bool  # the context was cut from the left to fit the window


def encode_request(encode: Encode, context: str, continuation: str, eos: int) -> Request:
    """(context ids, continuation ids) split as lm-eval splits them (see the module docstring);
    an empty context is the end-of-text token."""
    if not context:
        return [eos], encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    return head, whole[len(head) :]


def request_window(context: list[int], continuation: list[int], block_size: int) -> tuple[list[int], bool]:
    """The model's input for one request: context + continuation less its last token, at most
    `block_size` tokens (the context's start cut), and whether anything was cut."""
    if not continuation:
        raise ValueError("a request needs at least one continuation token")
    if len(continuation) > block_size:
        raise UserError(
            f"a benchmark continuation of {len(continuation)} tokens does not fit the model's context ({block_size})"
        )
    tokens = context + continuation
    kept = tokens[-(block_size + 1) :]
    return kept[:-1], len(kept) < len(tokens)


@torch.no_grad()
def score_continuations(
    model: torch.nn.Module, requests: Sequence[Request], block_size: int, batch_size: int, device: torch.device | str
) -> list[Continuation]:
    """One `Continuation` per request, in order; `batch_size` requests per forward pass
    (right-padded: the model is causal, so padding after a request never changes its logits)."""
    was_training = model.training
    model.eval()
    results: list[Continuation] = []
    try:
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            windows = [request_window(context, continuation, block_size) for context, continuation in batch]
            width = max(len(inputs) for inputs, _ in windows)
            inputs = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, _) in enumerate(windows):
                inputs[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            inputs = inputs.to(device)
            with inference_autocast(inputs.device):
                logits = model(inputs, fp32_logits=True).logits  # (B, T, V)
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for row, ((ids, truncated), (_, continuation)) in enumerate(zip(windows, batch)):
                # The continuation's n tokens are predicted at the window's last n positions.
                positions = slice(len(ids) - len(continuation), len(ids))
                targets = torch.tensor(continuation, device=logprobs.device)  # (n,)
                rows = logprobs[row, positions]  # (n, V)
                results.append(
                    Continuation(
                        logprob=float(rows.gather(1, targets[:, None]).double().sum()),
                        greedy=bool((rows.argmax(dim=-1) == targets).all()),
                        truncated=truncated,
                    )
                )
    finally:
        model.train(was_training)
    return results
