"""Learning-rate schedules: linear warmup, then cosine decay or warmup-stable-decay.

The rate is a pure function of the optimizer step, so a resumed run needs no scheduler
state: the step in the checkpoint gives the rate.

- cosine (GPT-3, Brown et al. 2020, appendix B): warm up linearly to `lr`, then follow half
  a cosine down to `min_lr` at the last step.
- wsd, warmup-stable-decay (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations"): warm up, hold `lr`, and decay linearly to `min_lr`
  over the last `decay_fraction` of the steps.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["cosine", "wsd"]


def learning_rate(
    step: int,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    max_steps: int,
    schedule: Schedule = "cosine",
    decay_fraction: float = 0.2,
) -> float:
    """The rate for optimizer step `step` (0-based: the update that makes `step + 1` steps)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        decay_start, decay_steps = warmup_steps, max_steps - warmup_steps
    else:
        decay_steps = max(1, round(decay_fraction * max_steps))
        decay_start = max(warmup_steps, max_steps - decay_steps)
        decay_steps = max_steps - decay_start
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / max(1, decay_steps))  # reaches 1 at the last step
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
    return lr + progress * (min_lr - lr)
