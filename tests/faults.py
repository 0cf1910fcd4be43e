"""Fault injection for the reliability tests, loaded into a training subprocess through Hydra:
``+callbacks.fault._target_=faults.NaNGradientAt +callbacks.fault.step=5`` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class NaNGradientAt(Callback):
    """Puts a NaN into one gradient at the given optimizer step, as a bad batch would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
