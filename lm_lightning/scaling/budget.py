"""Model shapes from one size knob, and training length from a compute budget (SPEC §8).

A sweep lists depths, not every hyper-parameter: the width follows the depth by a fixed aspect
ratio (``n_embd = aspect_ratio · n_layer``, rounded to whole heads of ``head_size``), so the
non-embedding parameters grow as N ≈ 12·n_layer·n_embd² = 12·aspect²·n_layer³. Kaplan et al.
(2020) found loss nearly flat across aspect ratios 20–200 at fixed N; small CPU models here use
32 by default.

A compute budget C (training FLOPs, counted as the model reports them: 6·(N + head) + the
attention term per token) then fixes the number of steps, and, given tokens per parameter
(Chinchilla's ≈ 20), also the depth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import hydra
import torch

from lm_lightning.config.numbers import check_numbers
from lm_lightning.errors import UserError


def shape_for_depth(n_layer: int, aspect_ratio: float, head_size: int) -> dict[str, int]:
    """``n_layer`` blocks of width ``aspect_ratio · n_layer`` rounded to a multiple of ``head_size``."""
    if n_layer <= 0 or aspect_ratio <= 0 or head_size <= 0:
        raise UserError("scaling: model.n_layer, scaling.aspect_ratio and scaling.head_size must be positive")
    n_head = max(1, round(aspect_ratio * n_layer / head_size))
    return {"n_layer": n_layer, "n_embd": n_head * head_size, "n_head": n_head}


@dataclass(frozen=True)
class Plan:
    """A model shape and training length that spend a compute budget."""

    n_layer: int
    n_embd: int
    n_head: int
    steps: int
    non_embedding: int  # N
    flops_per_token: int  # as the model counts it
    tokens: int  # D = steps · tokens per step
    flops: int  # C = D · flops_per_token

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def model_figures(model_cfg: Mapping[str, Any]) -> tuple[int, int]:
    """(non-embedding parameters, training FLOPs per token) of a model config, built without memory."""
    with torch.device("meta"):
        model = hydra.utils.instantiate(dict(model_cfg))
    return model.parameter_count().non_embedding, model.flops_per_token()


def check_scaling_options(scaling: Mapping[str, Any] | None) -> None:
    """The ``scaling`` options are numbers in their ranges (null: off): named before a run folder exists, not a
    float() error at the start of the run."""
    check_numbers(scaling, {"compute_budget": (float, _positive, "training FLOPs, a number > 0"),
                            "tokens_per_param": (float, _positive, "a number > 0"),
                            "aspect_ratio": (float, _positive, "a number > 0 (width / depth)"),
                            "head_size": (int, _positive, "a whole number > 0"),
                            "time_budget": (float, _positive, "seconds of training, a number > 0"),
                            "measure_steps": (int, _positive, "a whole number > 0")}, "scaling.")
    scaling = scaling or {}
    if scaling.get("fit"):
        if scaling.get("tokens_per_param"):
            raise UserError("scaling.fit and scaling.tokens_per_param both choose the depth: set one of them")
        if not scaling.get("aspect_ratio"):
            raise UserError("scaling.fit chooses the depth: set scaling.aspect_ratio (the width per layer the "
                            "ladder used) too")
        if bool(scaling.get("compute_budget")) == bool(scaling.get("time_budget")):
            raise UserError("scaling.fit needs one budget: scaling.compute_budget (training FLOPs) or "
                            "scaling.time_budget (seconds)")
    elif scaling.get("time_budget"):
        raise UserError("scaling.time_budget needs scaling.fit=<fits.json>: the fitted L(N, D) turns each depth's "
                        "measured tokens a second into a predicted loss")


def _positive(value: float) -> bool:
    return 0 < value < math.inf


def plan_budget(model_cfg: Mapping[str, Any], budget: float, tokens_per_step: int, aspect_ratio: float | None = None,
                head_size: int = 32, tokens_per_param: float | None = None, max_layers: int = 48) -> Plan:
    """The steps (and, with ``tokens_per_param``, the depth) that spend ``budget`` training FLOPs.

    With ``tokens_per_param`` the depth is the one (1..max_layers, shaped by ``aspect_ratio``) whose
    D/N = (budget / flops_per_token) / N is closest to it on a log scale; otherwise the config's shape
    is kept (shaped by ``aspect_ratio`` when given). Steps round to the nearest whole step.
    """
    if budget <= 0 or tokens_per_step <= 0:
        raise UserError(f"scaling.compute_budget={budget} must be positive")
    if tokens_per_param is not None:
        if aspect_ratio is None:
            raise UserError("scaling.tokens_per_param chooses the depth: set scaling.aspect_ratio too")
        candidates = []
        for depth in range(1, max_layers + 1):
            shape = shape_for_depth(depth, aspect_ratio, head_size)
            n, fpt = model_figures({**model_cfg, **shape})
            ratio = budget / fpt / n
            candidates.append((abs(math.log(ratio / tokens_per_param)), shape, n, fpt))
            if ratio <= tokens_per_param:  # N and FLOPs/token grow with depth, so D/N only falls from here
                break
        _, shape, n, fpt = min(candidates, key=lambda c: c[0])
    else:
        shape = (shape_for_depth(int(model_cfg["n_layer"]), aspect_ratio, head_size) if aspect_ratio
                 else {k: int(model_cfg[k]) for k in ("n_layer", "n_embd", "n_head") if k in model_cfg})
        n, fpt = model_figures({**model_cfg, **shape})
    steps = max(1, round(budget / (fpt * tokens_per_step)))
    tokens = steps * tokens_per_step
    return Plan(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape.get("n_head", 0), steps=steps, non_embedding=n, flops_per_token=fpt, tokens=tokens, flops=tokens * fpt)


def describe_plan(plan: Plan, budget: float | None, seconds: float | None = None) -> str:
    """One line: the shape, the steps, N, D, D/N and C against the FLOP budget (or in ``seconds`` of training)."""
    spent = (f"in {seconds:,.0f} s of training" if budget is None
             else f"= {plan.flops / budget:.2%} of the budget {budget:.4g}")
    return (f"n_layer {plan.n_layer}, n_embd {plan.n_embd}, n_head {plan.n_head}: {plan.steps:,} steps, "
            f"N {plan.non_embedding:,}, D {plan.tokens:,} ({plan.tokens / plan.non_embedding:.1f} tokens/N), "
            f"C {plan.flops:.4g} FLOPs {spent}")
