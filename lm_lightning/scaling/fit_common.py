"""What every scaling-law fit shares (``power_law.py``, ``chinchilla.py``, ``isoflop.py``): the checks
on its inputs, the 95% percentile-bootstrap interval, R² (the fits report it on log loss), the
result base class whose ``as_dict`` is the JSON record (bootstrap sample arrays left out), and the
one-BLAS-thread limit the optimisers run under. Pure numpy. Units throughout the fits: N in
parameters, D in tokens, C in FLOPs with C = 6·N·D, loss in nats per token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

Interval = tuple[float, float] | None


def check_positive(name: str, values: Any, where: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{where}: {name} must be one-dimensional (got shape {array.shape})")
    bad = np.flatnonzero(~np.isfinite(array) | (array <= 0))
    if bad.size:
        raise ValueError(f"{where}: {name} must be positive and finite (got {name}[{bad[0]}] = {array[bad[0]]})")
    return array


def check_same_length(where: str, **arrays: np.ndarray) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{where}: inputs must have the same length (got {lengths})")
    return next(iter(lengths.values()))


def check_at_least(where: str, n: int, needed: int, why: str) -> None:
    if n < needed:
        raise ValueError(f"{where}: needs at least {needed} points ({why}); got {n}")


def bootstrap_interval(samples: np.ndarray) -> Interval:
    """95% percentile interval of the finite samples, or None without any."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return None
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return value.as_dict()
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None  # JSON has no NaN/inf
    if isinstance(value, np.integer):
        return int(value)
    return value


class FitResult:
    """``as_dict()`` for JSON: every field except the bootstrap sample arrays (``*_samples``)."""

    def as_dict(self) -> dict[str, Any]:
        return {field.name: _jsonable(getattr(self, field.name)) for field in dataclasses.fields(self)
                if not field.name.endswith("_samples")}


def scalar_or_array(values: np.ndarray, like: Any) -> float | np.ndarray:
    return float(values) if np.ndim(like) == 0 else values


@contextlib.contextmanager
def one_blas_thread() -> Any:
    """Run the optimisers with one BLAS thread.

    L-BFGS-B and least_squares call BLAS on 5-vectors; on a busy machine OpenBLAS's worker
    threads spin for them and a Chinchilla fit became 4-20x slower (2 shared cores, measured).
    The limit is process-wide while a fit runs.
    """
    with threadpool_limits(1, user_api="blas"):
        yield


def r_squared(y: Sequence[float] | np.ndarray, y_hat: Sequence[float] | np.ndarray) -> float:
    """Coefficient of determination 1 − SS_res/SS_tot of predictions ``y_hat`` for ``y`` (NaN when y is constant)."""
    y, y_hat = np.asarray(y, dtype=float), np.asarray(y_hat, dtype=float)
    if y.shape != y_hat.shape:
        raise ValueError(f"r_squared: y and y_hat must have the same shape (got {y.shape} and {y_hat.shape})")
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - y_hat) ** 2)) / ss_tot if ss_tot > 0 else float("nan")


def resampled_losses(rng: np.random.Generator, index: np.ndarray, loss: np.ndarray,
                     seed_losses: Sequence[Sequence[float]] | None) -> np.ndarray:
    """The losses of a bootstrap resample ``index`` of the points. Without ``seed_losses`` each point's loss; with
    them (one list of per-seed losses per point) the mean of that point's seeds resampled with replacement, so the
    intervals also carry the seed noise (a two-level bootstrap: points, then seeds within each point)."""
    if seed_losses is None:
        return loss[index]
    return np.array([rng.choice(np.asarray(seed_losses[i], dtype=float), len(seed_losses[i])).mean() for i in index])


def check_seed_losses(seed_losses: Sequence[Sequence[float]] | None, n: int, where: str) -> None:
    if seed_losses is not None and (len(seed_losses) != n or any(len(s) == 0 for s in seed_losses)):
        raise ValueError(f"{where}: seed_losses must hold a non-empty list of losses for each of the {n} points")
