"""Training callbacks that Lightning does not ship in the form we need."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor as _LightningThroughputMonitor
from lightning.pytorch.utilities import rank_zero_only


def _batch_size(batch: Any) -> int:
    return batch.size(0)


def _batch_tokens(batch: Any) -> int:
    return batch[:, 1:].numel()


class ThroughputMonitor(_LightningThroughputMonitor):
    """Lightning's ThroughputMonitor (tokens/s, FLOP/s, MFU) with a configurable peak.

    Lightning knows the peak FLOP/s of GPUs but not of CPUs; ``peak_flops`` fills the gap
    (default on CPU: 129 GFLOP/s, the fp32 matmul peak measured on this project's machines,
    BASELINES.md). A value given here overrides Lightning's table on any device.
    """

    def __init__(self, peak_flops: float | None = None, cpu_peak_flops: float = 129e9, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_batch_size, length_fn=_batch_tokens, window_size=window_size)
        self.peak_flops, self.cpu_peak_flops = peak_flops, cpu_peak_flops

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops
        if peak is None and self.available_flops is None and trainer.strategy.root_device.type == "cpu":
            peak = self.cpu_peak_flops
        if peak is not None:
            self.available_flops = int(peak)
            for throughput in self._throughputs.values():
                throughput.available_flops = int(peak)

    @rank_zero_only
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:
        # time validation (so it is taken out of training throughput) but do not log it: its own
        # batch counter as the step would run backwards on the tracker's step axis
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)
