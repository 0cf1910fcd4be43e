"""An exponential moving average of the weights that validates, checkpoints and is kept only once it has averaged a step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging
from omegaconf import DictConfig

from lm_lightning.errors import UserError


class StartedEMA(EMAWeightAveraging):
    """Lightning's EMA of the weights, standing in for them only once it has averaged a step.

    Before ``update_starting_at_step`` Lightning's average is a copy of the starting weights, and it
    would validate, checkpoint and finally keep that copy; here the live weights serve until then.
    """

    _swapped = False

    def _started(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swapped = self._started()
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._started():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._started():  # the average's weights go in state_dict only once there is an average
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "averaging_state" in checkpoint:  # a checkpoint saved before the average started holds none of it
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def weight_averaging(ema: DictConfig | None) -> list[L.Callback]:
    """Lightning's EMA of the weights when ``ema.decay`` is set: validation, the saved checkpoint and the
    final figures then use the averaged weights."""
    if ema is None or ema.get("decay") is None:
        return []
    if not 0 < ema.decay < 1:
        raise UserError(f"ema.decay={ema.decay} must be between 0 and 1 (e.g. 0.995), or null for no average")
    return [StartedEMA(decay=float(ema.decay), update_starting_at_step=int(ema.get("start_step") or 0))]
