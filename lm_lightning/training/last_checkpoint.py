"""``last.ckpt`` at the end of a run holds the final step, whatever the last-checkpoint callback's period."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lm_lightning.parallel.checkpoint import METADATA, is_sharded
from lm_lightning.training.checkpoint_io import load_checkpoint_file


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step a checkpoint file (or a sharded checkpoint folder) was saved at; None without one.
    The tensors are memory-mapped, not read."""
    path = Path(path)
    if is_sharded(path):
        path = path / METADATA
    if not path.is_file():
        return None
    return load_checkpoint_file(path, mmap=True).get("global_step")


def save_last(trainer: L.Trainer, path: Path) -> None:
    """Saves the final state to ``path`` unless a ``save_last`` checkpoint callback already wrote it at the
    final step (the callback writes last.ckpt every n steps; a run's length need not be a multiple of n)."""
    if trainer.global_step == 0:
        return
    current = None
    if trainer.is_global_zero:  # the file is rank 0's; every rank must take the same decision to save
        current = any(checkpoint_step(callback.last_model_path) == trainer.global_step
                      for callback in trainer.checkpoint_callbacks
                      if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.last_model_path)
    if not trainer.strategy.broadcast(current, src=0):
        trainer.save_checkpoint(path)
