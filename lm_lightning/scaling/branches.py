"""Warmup-stable-decay ladders (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations"): one stable-phase run per model size saves checkpoints at chosen steps
(:class:`BranchCheckpoints`, ``callbacks=wsd_stable``); each cooldown branch is its own ``lm-lightning train``
run resumed from one of them (``ckpt_path=<stable>/checkpoints/branch-step<S>.ckpt scheduler=wsd_branch
trainer.max_steps=<S + cooldown>``), so its run record counts every step, stable and cooldown, in D and C.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from lm_lightning.errors import UserError


class BranchCheckpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint, saving ``<dirpath>/branch-step<S>.ckpt`` (model, optimizer, scheduler, loops)
    at each of ``steps`` and nowhere else; every file is kept."""

    def __init__(self, dirpath: str, steps: Sequence[int], filename: str = "branch-step{step}") -> None:
        if not steps or any(int(step) <= 0 for step in steps):
            raise UserError(f"callbacks.branch_points.steps={list(steps)} must list positive optimizer steps")
        self.steps = sorted({int(step) for step in steps})
        super().__init__(dirpath=dirpath, filename=filename, every_n_train_steps=1, save_top_k=-1,
                         auto_insert_metric_name=False, enable_version_counter=False)

    @property
    def state_key(self) -> str:
        # distinct from the last-checkpoint callback's key even when that one also saves every step
        return self._generate_state_key(branch_steps=tuple(self.steps))

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        return trainer.global_step not in self.steps or super()._should_skip_saving_checkpoint(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.max_steps > 0 and self.steps[-1] > trainer.max_steps:
            raise UserError(f"callbacks.branch_points.steps reaches {self.steps[-1]}, past trainer.max_steps="
                            f"{trainer.max_steps}: run the stable phase at least as long as its last branch point")
