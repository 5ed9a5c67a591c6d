"""Learning-rate schedule of the official recipe, as a factor of the base lr per iteration.

Linear warm-up from 1e-5 to 1 over ``warmup_iters``, flat, then cosine to ``min_lr_ratio`` over
the second half of training (epochs 150-300 of 300), updated every iteration.
"""

from __future__ import annotations

import math


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    cosine_start: float = 0.5,
    min_lr_ratio: float = 0.05,
    warmup_start: float = 1e-5,
) -> float:
    """Multiplier of the base lr after ``step`` optimiser steps out of ``total_steps``."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * step / warmup_steps
    start = int(cosine_start * total_steps)
    if step < start:
        return 1.0
    t = min(step - start, total_steps - start) / max(total_steps - start, 1)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_steps_for(total_steps: int, warmup_iters: int = 1000, max_fraction: float = 0.1) -> int:
    """The official 1000 warm-up iterations, capped to ``max_fraction`` of a short run."""
    return max(1, min(warmup_iters, int(max_fraction * total_steps)))


def scaled_lr(base_lr: float, total_batch_size: int, base_batch_size: int = 256) -> float:
    """Linear scaling rule: the official lr is for a total batch of 256 (8 GPUs x 32)."""
    return base_lr * total_batch_size / base_batch_size
