"""Learning-rate schedules as multipliers of the optimizer's base lr, for ``LambdaLR``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from lm_lightning.errors import UserError


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio``·lr at ``total_steps``.

    Matches nanoGPT's ``get_lr``: warmup lr·(step+1)/(warmup+1); after ``total_steps`` the lr stays at the minimum.
    """
    _check(total_steps, warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, multiplier)


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps <= warmup_steps:
        raise UserError(f"scheduler.total_steps={total_steps} must exceed scheduler.warmup_steps={warmup_steps}")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / (warmup_steps + 1)


def warmup_linear(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup, then a straight line down to ``min_lr_ratio``·lr at ``total_steps``."""
    _check(total_steps, warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return 1.0 - progress * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, multiplier)


def warmup_constant(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup, then the peak lr for the rest of training."""
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup_steps) if step < warmup_steps else 1.0)


def warmup_stable_decay(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM): warmup, the peak lr, then a linear decay to
    ``min_lr_ratio``·lr over the last ``decay_fraction`` of ``total_steps``."""
    _check(total_steps, warmup_steps)
    if not 0.0 < decay_fraction <= 1.0:
        raise UserError(f"scheduler.decay_fraction={decay_fraction} must be in (0, 1]")
    decay_start = max(warmup_steps, total_steps - int(round(decay_fraction * total_steps)))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _warmup(step, warmup_steps)
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
        return 1.0 - progress * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, multiplier)
