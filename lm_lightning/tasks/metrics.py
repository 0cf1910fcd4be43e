"""Language-modelling metrics as a torchmetrics Metric, so they reduce correctly across devices."""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class LanguageModelMetrics(Metric):
    """Accumulates summed NLL (nats) and token counts; reports loss, perplexity and bits-per-byte.

    Bits-per-byte = NLL_total / (ln 2 · bytes), with bytes = tokens · bytes_per_token of the
    evaluated split: it does not depend on the tokenizer, so runs with different tokenizers compare.
    """

    full_state_update = False

    def __init__(self, bytes_per_token: float | None = None) -> None:
        super().__init__()
        self.bytes_per_token = bytes_per_token
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_tokens", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, n_tokens: torch.Tensor) -> None:
        self.nll_sum += nll_sum.to(torch.float64)
        self.n_tokens += n_tokens.to(torch.int64)

    def compute(self) -> dict[str, torch.Tensor]:
        loss = self.nll_sum / self.n_tokens.clamp(min=1)
        out = {"loss": loss.float(), "perplexity": torch.exp(loss).float()}
        if self.bytes_per_token:
            out["bpb"] = (loss / (math.log(2) * self.bytes_per_token)).float()
        return out


class Ratio(Metric):
    """hits / total accumulated over steps and devices: an accuracy over masked tokens or sentence pairs."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("hits", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, hits: torch.Tensor, total: torch.Tensor) -> None:
        self.hits += hits.to(torch.int64)
        self.total += total.to(torch.int64)

    def compute(self) -> torch.Tensor:
        return (self.hits / self.total.clamp(min=1)).float()
