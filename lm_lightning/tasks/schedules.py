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
    if total_steps <= warmup_steps:
        raise UserError(f"scheduler.total_steps={total_steps} must exceed scheduler.warmup_steps={warmup_steps}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
        return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)

    return LambdaLR(optimizer, multiplier)
