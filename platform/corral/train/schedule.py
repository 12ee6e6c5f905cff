"""Learning-rate schedules: linear warmup, then cosine decay to a floor (Llama 2: 10 % of peak)."""

from __future__ import annotations

import math
from collections.abc import Callable

from corral.config import OptimConfig


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Multiplier of the peak LR for the optimizer step about to run (`step` counts from 0).

    Warmup ramps linearly from 1/warmup to 1; cosine then falls from 1 at the end of warmup to
    `min_ratio` at `max_steps`, and stays there.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The factor function for `torch.optim.lr_scheduler.LambdaLR`."""
    return lambda step: lr_factor(step, optim.warmup_steps, max_steps, optim.min_lr_ratio, optim.schedule)
