"""Perplexity of a causal model on a token stream, each prediction scored exactly once.

Sliding windows (the transformers perplexity guide): windows of ``window`` tokens advance by ``stride``;
the first window scores all its predictions, each later one only its last ``stride``, so every token
after the first is predicted from at least ``window - stride`` tokens of context. The last window is
moved back to end at the end of the stream and scores only what is left, so nothing is dropped.
``stride = window`` is the non-overlapping evaluation; ``stride = 1`` gives every token a full window.

Carried state (recurrent models, the convention of recurrent-LM papers): consecutive non-overlapping
windows read in order by one sequence whose hidden state runs on from window to window, so each token
is predicted from the whole file before it.

The loop is Lightning's validation loop (device placement, ``max_batches``); the sums are a torchmetrics
metric, in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lm_lightning.errors import UserError
from lm_lightning.objectives.base import IGNORE, token_nll
from lm_lightning.tasks.metrics import LanguageModelMetrics


@dataclass(frozen=True)
class WindowPlan:
    """Window ``i`` reads ``lengths[i]`` tokens from ``starts[i]`` and scores its last ``scored[i]`` predictions."""

    starts: np.ndarray
    lengths: np.ndarray
    scored: np.ndarray


def sliding_windows(n_tokens: int, window: int, stride: int) -> WindowPlan:
    """Windows that score each of the ``n_tokens - 1`` predictions of a stream once, with at least
    ``window - stride`` tokens of context; one shorter window when the stream is shorter than a window."""
    n_predictions = n_tokens - 1
    if n_predictions <= window:
        return WindowPlan(np.array([0]), np.array([n_predictions]), np.array([n_predictions]))
    ends = np.append(np.arange(window, n_predictions, stride), n_predictions)  # position of each window's last target
    return WindowPlan(ends - window, np.full(len(ends), window), np.diff(ends, prepend=0))


def consecutive_windows(n_tokens: int, window: int) -> WindowPlan:
    """Non-overlapping windows of ``window`` tokens from the start, the last one shorter; all scored."""
    ends = np.append(np.arange(window, n_tokens - 1, window), n_tokens - 1)
    starts = np.concatenate([[0], ends[:-1]])
    return WindowPlan(starts, ends - starts, ends - starts)


class ScoredWindows(Dataset):
    """Item ``i``: (window ``i`` with its next token, (length + 1,) int64; how many of its predictions count)."""

    def __init__(self, tokens: np.ndarray, plan: WindowPlan) -> None:
        self.tokens, self.plan = tokens, plan

    def __len__(self) -> int:
        return len(self.plan.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        start, length = int(self.plan.starts[i]), int(self.plan.lengths[i])
        return torch.from_numpy(np.asarray(self.tokens[start : start + length + 1], dtype=np.int64)), int(self.plan.scored[i])


class WindowScorer(L.LightningModule):
    """Sums the negative log-likelihood (nats) of the scored predictions of each batch of windows.
    ``stateful``: the batch is one window of one sequence, read after the previous batch's (model(idx, caches))."""

    def __init__(self, model: nn.Module, stateful: bool = False) -> None:
        super().__init__()
        self.model, self.stateful = model, stateful
        self.totals = LanguageModelMetrics()
        self.caches = None

    def on_validation_epoch_start(self) -> None:
        self.caches = None  # a fresh zero state at the start of the file

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        windows, scored = batch  # (B, T + 1), (B,)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        if self.stateful:
            if self.caches is None:
                self.caches = self.model.new_caches(inputs.size(0), next(self.model.parameters()))
            logits = self.model(inputs, self.caches)  # the caches now hold the state after this window
        else:
            logits = self.model(inputs)
        keep = int(scored.max())  # the positions before are context in every row: no loss computed there
        logits, targets = logits[:, -keep:], targets[:, -keep:]
        position = torch.arange(keep, device=targets.device)
        targets = targets.masked_fill(position < keep - scored[:, None], IGNORE)
        self.totals.update(*token_nll(logits, targets))


@dataclass(frozen=True)
class Scores:
    """Summed NLL over the predictions scored, and how the stream was read."""

    nats: float
    predictions: int  # tokens scored: every token but the first, unless max_batches stopped early
    windows: int
    window: int
    stride: int | None  # None: state carried
    all_predictions: int  # of the whole stream (n_tokens - 1)

    @property
    def loss(self) -> float:
        """Nats per predicted token."""
        return self.nats / max(self.predictions, 1)

    @property
    def complete(self) -> bool:
        return self.predictions == self.all_predictions


def score_stream(model: nn.Module, tokens: np.ndarray, window: int, stride: int | None = None,
                 stateful: bool = False, batch_size: int = 16, max_batches: int | None = None,
                 accelerator: str = "auto") -> Scores:
    """Scores the (n_tokens,) stream ``tokens`` with the causal ``model`` (idx (B, T) → logits (B, T, V)):
    sliding windows of ``window`` tokens advancing by ``stride`` (None: ``window``, non-overlapping), or
    ``stateful`` (a model with ``new_caches``; ``batch_size`` does not apply: one sequence is read in order)."""
    stride = window if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise UserError(f"stride={stride} is not valid: give 1..{window} tokens (null: non-overlapping windows of {window})")
    if stateful and stride != window:
        raise UserError(f"stateful=true reads consecutive windows of {window} tokens with the state carried: leave stride unset")
    plan = consecutive_windows(len(tokens), window) if stateful else sliding_windows(len(tokens), window, stride)
    loader = DataLoader(ScoredWindows(tokens, plan), batch_size=1 if stateful else batch_size)
    scorer = WindowScorer(model, stateful)
    validation_trainer(accelerator, max_batches).validate(scorer, dataloaders=loader, verbose=False)
    batches = min(len(loader), max_batches or len(loader))
    return Scores(nats=float(scorer.totals.nll_sum), predictions=int(scorer.totals.n_tokens),
                  windows=min(len(plan.starts), batches * loader.batch_size), window=window,
                  stride=None if stateful else stride, all_predictions=len(tokens) - 1)


def validation_trainer(accelerator: str, max_batches: int | None) -> L.Trainer:
    """A one-device Trainer that only evaluates: no logger, checkpoint or model summary."""
    return L.Trainer(accelerator=accelerator, devices=1, logger=False, limit_val_batches=max_batches,
                     enable_model_summary=False, enable_checkpointing=False)


def report(scores: Scores, n_tokens: int, n_bytes: int, words: int) -> dict[str, float | int | bool | None]:
    """Loss (nats/token), perplexity per token and per word (exp(nats / words)), bits-per-byte
    (nats / ln 2 / bytes). When ``max_batches`` stopped early, bytes and words are prorated to the share scored."""
    share = scores.predictions / max(scores.all_predictions, 1)
    return {
        "tokens": n_tokens, "bytes": n_bytes, "words": words, "predictions": scores.predictions,
        "complete": scores.complete, "window": scores.window, "stride": scores.stride,
        "stateful": scores.stride is None, "windows": scores.windows, "nats": scores.nats,
        "loss": scores.loss, "perplexity": math.exp(scores.loss),
        "word_perplexity": math.exp(scores.nats / (words * share)) if words else None,
        "bits_per_byte": scores.nats / math.log(2) / (n_bytes * share) if n_bytes else None,
    }


def summary_line(name: str, result: dict) -> str:
    """One line: what was read, the figures, how the windows went."""
    if result["stateful"]:
        reading = f"state carried over {result['windows']:,} windows of {result['window']}"
    else:
        overlap = result["window"] - result["stride"]
        reading = (f"windows of {result['window']}, stride {result['stride']} "
                   + (f"(context >= {overlap} tokens)" if overlap else "(non-overlapping)"))
    word = f", {result['word_perplexity']:.2f} per word" if result["word_perplexity"] is not None else ""
    bpb = f"{result['bits_per_byte']:.4f}" if result["bits_per_byte"] is not None else "n/a"
    partial = "" if result["complete"] else (f" | max_batches: {result['predictions']:,} of {result['tokens'] - 1:,} "
                                             "tokens scored, bytes and words prorated")
    return (f"{name}: {result['tokens']:,} tokens, {result['bytes']:,} bytes, {result['words']:,} words | "
            f"loss {result['loss']:.4f} nats/token | perplexity {result['perplexity']:.3f} per token{word} | "
            f"bits-per-byte {bpb} | {reading}{partial}")
