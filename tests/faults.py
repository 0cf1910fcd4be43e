"""Fault injection for the reliability tests, loaded into a training subprocess through Hydra:
``+callbacks.fault._target_=faults.NaNGradientAt +callbacks.fault.step=5`` (tests/ is on PYTHONPATH)."""

from __future__ import annotations

import os
import signal

import lightning as L
from lightning.pytorch.callbacks import Callback


class NaNGradientAt(Callback):
    """Puts a NaN into one gradient at the given optimizer step, as a bad batch would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


class CtrlCAfterUpdate(Callback):
    """Presses Ctrl-C (SIGINT to this process) ``presses`` times right after the optimizer's update at the given
    step, before Lightning counts the step: a Ctrl-C landing mid-step."""

    def __init__(self, step: int, presses: int = 1) -> None:
        self.step, self.presses = step, presses

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def press(*_: object) -> None:
            if trainer.global_step == self.step:
                for _ in range(self.presses):
                    os.kill(os.getpid(), signal.SIGINT)

        trainer.optimizers[0].register_step_post_hook(press)
