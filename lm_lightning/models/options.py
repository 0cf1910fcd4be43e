"""Checks of model options, run by each config dataclass's ``__post_init__``. Composing a training config
builds the dataclass too (``config/checks.py``), so a bad value is refused before anything runs, in one
UserError that names the option and what to give."""

from __future__ import annotations

import numbers
from collections.abc import Collection

from lm_lightning.errors import UserError
from lm_lightning.models.layers import ACTIVATIONS, NORM_POSITIONS, NORMS, hidden_width


def require_positive_ints(config: object, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise UserError(f"model.{name}={value!r} must be a positive integer")


def require_positive_numbers(config: object, *names: str) -> None:
    """Each option is a finite number above 0 (an option set to None, where its default is None, is skipped)."""
    for name in names:
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
            raise UserError(f"model.{name}={value!r} must be a positive number")


def require_choice(config: object, name: str, choices: Collection[str]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise UserError(f"model.{name}={value!r} is not known: choose one of {', '.join(choices)}")


def require_dropout(config: object) -> None:
    if not 0.0 <= float(config.dropout) < 1.0:
        raise UserError(f"model.dropout={config.dropout} must be in [0, 1)")


def require_block_options(config: object) -> None:
    """The options of transformer blocks (``layers.Block``): heads that divide the width, the norm, its
    position, the activation, dropout and Mixture-of-Experts routing. Call after the positive sizes."""
    if config.n_embd % config.n_head:
        raise UserError(f"model.n_head={config.n_head} does not divide model.n_embd={config.n_embd}: "
                        "choose a head count that divides the width")
    for name, choices in (("norm", NORMS), ("norm_position", NORM_POSITIONS), ("activation", ACTIVATIONS)):
        require_choice(config, name, choices)
    require_dropout(config)
    require_positive_numbers(config, "mlp_ratio", "norm_eps")
    if getattr(config, "mlp_hidden", None) is None and hidden_width(config.n_embd, config.mlp_ratio, config.activation) < 1:
        raise UserError(f"model.mlp_ratio={config.mlp_ratio} gives a feed-forward of no units at model.n_embd="
                        f"{config.n_embd}: choose a larger ratio")
    if config.n_experts < 0:
        raise UserError(f"model.n_experts={config.n_experts} must be 0 (dense) or more")
    if config.n_experts and not 1 <= config.moe_top_k <= config.n_experts:
        raise UserError(f"model.moe_top_k={config.moe_top_k} must be between 1 and model.n_experts={config.n_experts}")
