"""Learning-rate schedules counted in epochs (torch's epoch schedulers, e.g. ``MultiStepLR``), for the
recipes that state their schedule per epoch, as Zaremba et al. 2014 halve the rate after each epoch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def per_epoch(optimizer: Optimizer, scheduler: Callable[[Optimizer], LRScheduler]) -> dict[str, Any]:
    """Lightning's scheduler config for ``scheduler(optimizer)``, stepped once at the end of every epoch."""
    return {"scheduler": scheduler(optimizer), "interval": "epoch", "frequency": 1}
