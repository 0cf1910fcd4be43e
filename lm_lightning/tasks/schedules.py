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


class CooldownLR(LambdaLR):
    """The cooldown of a warmup-stable-decay branch (Hägele et al. 2024): from the stable lr at
    ``decay_start`` down to ``min_lr_ratio``·lr at ``total_steps``, linearly or as 1 − √progress.

    Before ``warmup_steps`` it warms up as the stable run did. ``decay_start=None`` is the step of the
    checkpoint the run resumes from (``ckpt_path=`` a stable run's branch checkpoint): Lightning restores
    the stable run's scheduler state into this one and the step it holds is taken as the start. Once set, ``decay_start`` is an attribute, so it is part of
    this scheduler's own state and a branch resumed from its own last.ckpt keeps its start; without a
    checkpoint the decay starts after the warmup.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
                 shape: str = "linear", decay_start: int | None = None) -> None:
        _check(total_steps, warmup_steps)
        if shape not in ("linear", "1-sqrt"):
            raise UserError(f"scheduler.shape={shape!r} must be linear or 1-sqrt")
        if decay_start is not None and not 0 <= decay_start < total_steps:
            raise UserError(f"scheduler.decay_start={decay_start} must be below scheduler.total_steps={total_steps}")
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio
        self.shape, self.decay_start = shape, decay_start
        # a plain function, not a bound method: LambdaLR keeps no state of it in checkpoints
        super().__init__(optimizer, lambda step: self.multiplier(step))

    def multiplier(self, step: int) -> float:
        if step < self.warmup_steps:  # the stable run's warmup: only a branch started without a checkpoint sees it
            return _warmup(step, self.warmup_steps)
        start = self.decay_start if self.decay_start is not None else self.warmup_steps
        progress = min(max(step - start, 0) / max(self.total_steps - start, 1), 1.0)
        fall = progress if self.shape == "linear" else math.sqrt(progress)
        return 1.0 - fall * (1.0 - self.min_lr_ratio)

    def load_state_dict(self, state_dict: dict) -> None:
        own = {k: v for k, v in state_dict.items() if k not in ("total_steps", "warmup_steps", "min_lr_ratio", "shape")}
        super().load_state_dict(own)  # this run's length and shape stand; a stable run's state has no decay_start
        if self.decay_start is None:
            self.decay_start = self.last_epoch
            if self.decay_start >= self.total_steps:
                raise UserError(f"the checkpoint is at step {self.decay_start}, not below trainer.max_steps="
                                f"{self.total_steps}: a cooldown branch must run past the step it starts from")


def cooldown(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0,
             shape: str = "linear", decay_start: int | None = None) -> CooldownLR:
    """A cooldown branch's schedule (:class:`CooldownLR`)."""
    return CooldownLR(optimizer, total_steps, warmup_steps, min_lr_ratio, shape, decay_start)
