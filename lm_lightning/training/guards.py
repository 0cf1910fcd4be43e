"""Callbacks for the faults a long run meets: a non-finite loss or gradient, and pre-emption signals."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lm_lightning.errors import UserError
from lm_lightning.tracking.callbacks import reaches_loggers

log = logging.getLogger("lm_lightning")
MODES = ("skip", "stop")


class NonFiniteGuard(Callback):
    """Checks every gradient before the optimizer step.

    ``skip``: a NaN/Inf anywhere drops the whole update (gradients set to None, so AdamW leaves
    weights and moments untouched), counts it as ``train/skipped_steps`` and goes on; after
    ``max_skips`` skipped steps the run stops. ``stop``: the run ends with an error and a
    checkpoint ``nonfinite-step<N>.ckpt`` of the weights from before the bad step.
    """

    def __init__(self, mode: str = "skip", max_skips: int = 100) -> None:
        if mode not in MODES:
            raise UserError(f"callbacks.nonfinite.mode={mode!r} is not known: choose skip or stop")
        self.mode, self.max_skips = mode, max_skips
        self.skipped = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # the optimizer's own list: walking the module tree for its parameters costs more than the check
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # a NaN/Inf anywhere makes the total norm non-finite: foreach kernels over all tensors (a per-tensor
        # isfinite().all() cost 1-10 ms a step on a busy 2-core CPU, against nanoGPT's 35 ms step); a norm
        # that overflows (entries beyond ~1e19 in float32) counts too, as gradient clipping would make it NaN
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads)
        if norm.isfinite():
            if hasattr(pl_module, "grad_norm"):  # gradient clipping, right after, reuses it (LanguageModelTask)
                pl_module.grad_norm = norm
            return
        step = trainer.global_step
        if self.mode == "stop":
            for p in pl_module.parameters():
                p.grad = None
            path = Path(trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir)
            path = path / f"nonfinite-step{step}.ckpt"
            trainer.save_checkpoint(path, weights_only=False)  # the full state (optimizer too): it resumes
            raise NonFiniteError(f"non-finite loss or gradient at step {step}; the weights from before it are "
                                 f"saved in {path} (callbacks.nonfinite.mode=skip skips such steps instead)")
        for p in pl_module.parameters():
            p.grad = None
        self.skipped += 1
        log.warning("non-finite gradient at step %d: update skipped (%d so far)", step, self.skipped)
        if self.skipped > self.max_skips:
            raise NonFiniteError(f"{self.skipped} steps had non-finite gradients, more than "
                                 f"callbacks.nonfinite.max_skips={self.max_skips}: lower the learning rate or check the data")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if reaches_loggers(trainer, trainer.global_step):  # only then: each self.log costs ~0.7 ms on CPU
            pl_module.log("train/skipped_steps", float(self.skipped))

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = state_dict.get("skipped", 0)


class NonFiniteError(UserError):
    """Training met a non-finite loss or gradient in stop mode."""


class PreemptionSignals(Callback):
    """Treats the given signals (e.g. SLURM's SIGUSR1 warning before a time limit) as SIGTERM.

    Lightning handles SIGTERM itself: it finishes the current batch and raises
    ``SIGTERMException``; the last-checkpoint callback (``save_on_exception``) then writes
    ``last.ckpt``, and ``lm-lightning train`` exits 0 with a note on how to resume.
    """

    def __init__(self, signals: list[str] | None = None) -> None:
        self.signals = list(signals or ["SIGUSR1"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.signals:
            signal.signal(getattr(signal, name), lambda *_: os.kill(os.getpid(), signal.SIGTERM))


class CtrlCAtStepEnd(Callback):
    """The first Ctrl-C during ``fit`` stops training at the end of the step in flight, by Lightning's SIGTERM path
    (every rank stops after the same step; the last-checkpoint callback saves), so the saved state is a whole step's
    and a resume goes on exactly as the uninterrupted run would; ``pressed`` tells ``train`` to exit 130 as for
    Ctrl-C. A second Ctrl-C interrupts at once. A KeyboardInterrupt raised anywhere inside a step (between the
    optimizer's update and Lightning's step counter, say) could leave a state whose resume repeats or skips work."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            self._previous = signal.signal(signal.SIGINT, self._first_press)

    def _first_press(self, signum: int, frame: Any) -> None:
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt, now
        log.warning("Ctrl-C: stopping at the end of this step and saving last.ckpt (Ctrl-C again stops at once)")
        os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
