"""The output head and the cross-entropy in one pass, a chunk of positions at a time.

Training needs the loss and its gradients, never the logits. Computed whole, gpt2-small's
fp32 logits are about 206 MB per 1,024-token sequence, and their softmax and gradient as
much again: at batch 64 the loss alone would hold tens of GB and its memory traffic would
cost a quarter of the step. Here each chunk of `chunk` positions computes its (chunk, V)
logits, its fp32 log-softmax, its loss, and at once its share of the gradients
(softmax - one-hot, times the head weight and the hidden states); then the chunk's logits
are dropped. The backward only scales the gradients by the incoming scalar. Same FLOPs as
head + cross-entropy + their backward, at most one chunk of logits alive.

Hand-written: torch has no fused linear + cross-entropy, and the libraries that do
(Liger-Kernel, Apple's cut-cross-entropy) are CUDA/Triton only. torch.compile traces this
Function whole (no graph break; the chunk loop unrolls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.scoring import IGNORE


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int
) -> torch.Tensor:
    """The summed cross-entropy of `hidden @ weight.T` (logits) against `targets`, over targets != -100.

    hidden (N, C); weight (Vp, C), whose rows past `vocab_size` are padding and never
    scored; targets (N,). Matmuls run in the autocast dtype when autocast is on, the
    softmax in fp32. Without autograd (validation) no gradients are computed.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.size(0), chunk):
        logits = F.linear(hidden[start : start + chunk], weight)[:, :vocab_size].to(total.dtype)  # (chunk, V)
        total = total + F.cross_entropy(logits, targets[start : start + chunk], ignore_index=IGNORE, reduction="sum")
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk: int
    ) -> torch.Tensor:
        padding = weight.size(0) - vocab_size
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        exact = torch.promote_types(dtype, torch.float32)  # softmax, loss and summed gradients: fp32 or better
        grad_hidden = torch.empty_like(hidden)  # (N, C)
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device)  # (Vp, C)
        total = hidden.new_zeros((), dtype=exact)
        hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)  # cast once for all chunks, as autocast would
        for start in range(0, hidden.size(0), chunk):
            rows, wanted = hidden_c[start : start + chunk], targets[start : start + chunk]  # (n, C), (n,)
            scored = (wanted != IGNORE)[:, None]  # (n, 1)
            target = wanted.clamp(min=0)[:, None]  # (n, 1); an ignored row reads column 0, masked out below
            log_probs = F.linear(rows, weight_c)[:, :vocab_size].to(exact).log_softmax(dim=-1)  # (n, V)
            total = total - (log_probs.gather(1, target) * scored).sum()
            # d loss / d logits = softmax - one_hot(target), in place. Ignored rows are zeroed on the
            # (n, C) side of the matmuls below, which is V / C times cheaper than on the logits.
            grad_logits = log_probs.exp_().scatter_add_(1, target, torch.full_like(log_probs[:, :1], -1))
            if padding:
                grad_logits = F.pad(grad_logits, (0, padding))  # (n, Vp): padded logits get no gradient
            grad_logits = grad_logits.to(dtype)
            grad_hidden[start : start + chunk] = ((grad_logits @ weight_c) * scored).to(hidden.dtype)
            grad_weight += grad_logits.t() @ (rows * scored)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_total.to(grad_hidden.dtype),
            grad_weight * grad_total.to(grad_weight.dtype),
            None,
            None,
            None,
        )
