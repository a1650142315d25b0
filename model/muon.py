"""Muon for the blocks' matrices: `torch.optim.Muon`, with its Newton–Schulz iteration in the
precision the device multiplies fast.

torch's Muon always orthogonalizes in bfloat16, which suits a GPU's tensor cores. A CPU without
native bf16 matrix units (AVX2 only, such as the 2-core AMD EPYC this project is developed on)
runs those bf16 products in a slow emulated kernel: measured there, one step of the tiny
preset's 16 matrices took 16 s in bf16 and about 1 s in float32, against 6 s for the forward
and backward of its 4,096 tokens. torch exposes no setting for the iteration's dtype, so on such
devices `Muon.step` runs the same update as torch's, written out below, with the iteration in
float32 (also the more exact of the two). On CUDA it is torch's own step.

The optimizer's state (`momentum_buffer` per matrix) and its param groups are torch's, so
checkpoints load either way.
"""

from __future__ import annotations

import math

import torch


def orthogonalize(update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float):
    """Muon's quintic Newton–Schulz iteration (Keller Jordan's coefficients), in `update`'s dtype:
    about U V^T of update = U S V^T, with singular values pushed into roughly (0.5, 1.5)."""
    a, b, c = coefficients
    wide = update.T if update.size(0) > update.size(1) else update  # (m, n) with m <= n: X X^T is the small Gram
    x = wide / wide.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T  # (m, m)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a X + (b A + c A^2) X
    return x.T if update.size(0) > update.size(1) else x


def adjusted_lr(lr: float, rule: str | None, shape: torch.Size) -> float:
    """The learning rate for a matrix of `shape`: "match_rms_adamw" scales the update to AdamW's
    RMS (Moonshot, "Muon is Scalable for LLM Training"); "original" is Keller Jordan's scale."""
    rows, columns = shape[:2]
    if rule == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, columns))
    return lr * math.sqrt(max(1, rows / columns))


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` whose Newton–Schulz iteration runs in `ns_dtype`: by default bfloat16
    on CUDA (torch's own step) and float32 on any other device."""

    def __init__(self, params, *, ns_dtype: torch.dtype | None = None, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    def iteration_dtype(self) -> torch.dtype:
        if self.ns_dtype is not None:
            return self.ns_dtype
        first = self.param_groups[0]["params"][0]
        return torch.bfloat16 if first.device.type == "cuda" else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        dtype = self.iteration_dtype()
        if dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for param in (p for p in group["params"] if p.grad is not None):
                grad = param.grad
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(grad))
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                update = orthogonalize(update.to(dtype), group["ns_coefficients"], group["ns_steps"], group["eps"])
                param.mul_(1 - lr * decay)
                param.add_(update.to(param.dtype), alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss
