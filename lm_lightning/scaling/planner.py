"""The depth a fitted L(N, D) predicts best at a budget (``lm-lightning scaling plan scaling.fit=...``).

``scaling fit`` over a ladder of runs gives the parametric L(N, D) = E + A/N^α + B/D^β (Hoffmann et al. 2022).
Each depth, its width following by the aspect ratio, is given the tokens the budget buys it: at a budget of
training FLOPs, D = budget / its FLOPs per token; at a wall-time budget, D = its tokens per second on this machine
× the seconds, measured with a few timed training steps of that shape (random tokens, the configured optimizer),
so a shape that sustains fewer FLOP/s on these cores is charged for it. The plan is the depth of least predicted
loss; the table of every depth tried shows how flat the choice is.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_lightning.errors import UserError
from lm_lightning.scaling.budget import Plan, model_figures, shape_for_depth

LAW_KEYS = ("E", "A", "B", "alpha", "beta")


@dataclass(frozen=True)
class Candidate:
    """One depth at the budget: its shape, N, FLOPs a token, measured speed (wall-time budgets), tokens, loss."""

    shape: dict[str, int]
    non_embedding: int
    flops_per_token: int
    tokens_per_second: float | None
    steps: int
    tokens: int
    predicted_loss: float


def load_law(where: str | Path) -> dict[str, float]:
    """E, A, B, alpha and beta of the L(N, D) fit in ``where``: a fits.json, the ``scaling_fit`` folder holding it,
    or the sweep folder ``scaling fit`` wrote that folder into."""
    path = Path(where).expanduser()
    candidates = [path] if path.suffix == ".json" else [path / "fits.json", path / "scaling_fit" / "fits.json"]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"scaling.fit={where}: no fits.json there; run `lm-lightning scaling fit runs=[<ladder "
                        "folder>]` first and pass the fits.json it writes (or its folder)")
    try:
        record = json.loads(found.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"scaling.fit: {found} is not a readable fits.json ({err}); run `lm-lightning scaling fit` "
                        "again to rewrite it") from None
    law = record.get("L(N,D)") if isinstance(record, dict) else None
    if not isinstance(law, dict) or not all(_finite(law.get(k)) for k in LAW_KEYS) or law["A"] < 0 or law["B"] < 0:
        raise UserError(f"scaling.fit: {found} holds no L(N, D) fit; `scaling fit` makes one from at least 6 runs "
                        "with 2 or more model sizes and 2 or more token counts (a ladder at two budgets)")
    return {k: float(law[k]) for k in LAW_KEYS}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def predicted_loss(law: Mapping[str, float], n: float, d: float) -> float:
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def plan_from_fit(model_cfg: Mapping[str, Any], law: Mapping[str, float], tokens_per_step: int, aspect_ratio: float,
                  head_size: int, *, budget: float | None = None, seconds: float | None = None,
                  tokens_per_second: Callable[[dict[str, Any]], float] | None = None, max_layers: int = 24,
                  patience: int = 2) -> tuple[Plan, list[Candidate]]:
    """The depth of least predicted loss at ``budget`` training FLOPs, or at ``seconds`` of training when
    ``tokens_per_second(model_cfg)`` says how fast each shape trains here; every depth tried, in order.

    Depths run from 1 up until the predicted loss has risen ``patience`` times in a row past the best (the loss
    has one minimum in depth: more parameters against fewer tokens), a plan is down to one step, or
    ``max_layers``.
    """
    if (budget is None) == (seconds is None):
        raise UserError("scaling plan from a fit needs one budget: scaling.compute_budget (FLOPs) or "
                        "scaling.time_budget (seconds)")
    if seconds is not None and tokens_per_second is None:
        raise ValueError("a wall-time budget needs tokens_per_second")
    candidates: list[Candidate] = []
    rises = 0
    for depth in range(1, max_layers + 1):
        shape = shape_for_depth(depth, aspect_ratio, head_size)
        config = {**model_cfg, **shape}
        n, fpt = model_figures(config)
        speed = tokens_per_second(config) if seconds is not None else None
        tokens_bought = budget / fpt if budget is not None else speed * seconds
        steps = max(1, round(tokens_bought / tokens_per_step))
        tokens = steps * tokens_per_step
        candidates.append(Candidate(shape, n, fpt, speed, steps, tokens, predicted_loss(law, n, tokens)))
        best = min(c.predicted_loss for c in candidates)
        rises = rises + 1 if candidates[-1].predicted_loss > best else 0
        if rises >= patience or steps == 1:
            break
    chosen = min(candidates, key=lambda c: c.predicted_loss)
    plan = Plan(n_layer=chosen.shape["n_layer"], n_embd=chosen.shape["n_embd"], n_head=chosen.shape["n_head"],
                steps=chosen.steps, non_embedding=chosen.non_embedding, flops_per_token=chosen.flops_per_token,
                tokens=chosen.tokens, flops=chosen.tokens * chosen.flops_per_token)
    return plan, candidates


def measure_tokens_per_second(model_cfg: Mapping[str, Any], optimizer_factory: Callable[..., Any], batch_size: int,
                              steps: int = 5, warmup: int = 2, seed: int = 0) -> float:
    """Training tokens a second of ``model_cfg`` on this machine: ``steps`` timed steps (forward, cross-entropy,
    backward, the configured optimizer) of ``batch_size`` random windows, after ``warmup`` untimed ones."""
    import hydra
    import torch
    import torch.nn.functional as F

    from lm_lightning.tasks.param_groups import parameter_groups

    torch.manual_seed(seed)
    model = hydra.utils.instantiate(dict(model_cfg))
    weight_decay = getattr(optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
    optimizer = optimizer_factory(params=parameter_groups(model, weight_decay))
    block = int(model_cfg["block_size"])
    windows = torch.randint(0, int(model_cfg["vocab_size"]), (batch_size, block + 1))
    inputs, targets = windows[:, :-1], windows[:, 1:]
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        logits = model(inputs)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch_size * block / (time.perf_counter() - start)


def describe_candidates(candidates: list[Candidate], chosen: Plan) -> str:
    """A table of every depth tried, the chosen one marked, and a note when it lies at the edge of those tried."""
    timed = any(c.tokens_per_second is not None for c in candidates)
    header = (f"{'n_layer':>7} {'n_embd':>6} {'N':>12} {'FLOPs/token':>12} "
              + (f"{'tokens/s':>9} " if timed else "") + f"{'steps':>8} {'D':>14} {'predicted loss':>15}")
    lines = [header]
    for c in candidates:
        mark = "  <- plan" if c.shape["n_layer"] == chosen.n_layer else ""
        speed = f"{c.tokens_per_second:>9,.0f} " if timed else ""
        lines.append(f"{c.shape['n_layer']:>7} {c.shape['n_embd']:>6} {c.non_embedding:>12,} {c.flops_per_token:>12,} "
                     f"{speed}{c.steps:>8,} {c.tokens:>14,} {c.predicted_loss:>15.4f}{mark}")
    if chosen.n_layer == candidates[0].shape["n_layer"]:
        lines.append("note: the least predicted loss is at the smallest depth tried; a smaller model may do better "
                     "still, beyond what the ladder measured")
    elif chosen.n_layer == candidates[-1].shape["n_layer"]:
        lines.append(f"note: the least predicted loss is at the largest depth tried ({chosen.n_layer}): the budget may "
                     "buy a deeper model still")
    return "\n".join(lines)
