"""Which pre-training objectives each architecture family can learn, checked when a config is composed.

An objective needs a model that can see what it predicts from and cannot see what it predicts:
causal LM needs left-to-right models; masked LM needs bidirectional ones; span corruption,
denoising and UL2 need an encoder and a decoder; next-sentence prediction needs BERT's [CLS] head.
"""

from __future__ import annotations

from collections.abc import Mapping

import hydra

from lm_lightning.errors import IncompatiblePair, UserError

RECURRENT = ("rnn", "lstm", "gru")
SEQ2SEQ = ("span_corruption", "bart_denoising", "ul2")

#: family -> objectives it trains with (a bidirectional recurrent model is its own entry)
VALID_OBJECTIVES: dict[str, tuple[str, ...]] = {
    "gpt": ("causal_lm",),
    "prefix_lm": ("prefix_lm", "causal_lm"),
    "bert": ("mlm", "mlm_nsp"),
    "t5": SEQ2SEQ,
    "bart": SEQ2SEQ,
    **{cell: ("causal_lm",) for cell in RECURRENT},
    **{f"bidirectional {cell}": ("mlm",) for cell in RECURRENT},
    "ffn": ("causal_lm",),
}


def family_of(model_cfg: Mapping) -> str:
    """The family key of a model config: its ``family``, marked bidirectional for recurrent models."""
    family = model_cfg.get("family")
    if family is None:
        raise UserError("the model config has no 'family' key: add one of " + ", ".join(sorted(VALID_OBJECTIVES)))
    if family in RECURRENT and model_cfg.get("bidirectional", False):
        return f"bidirectional {family}"
    return str(family)


def objective_name(objective_cfg: Mapping) -> str:
    """The objective's name, from the class its config builds."""
    return hydra.utils.get_class(objective_cfg["_target_"]).name


def check_compatible(model_cfg: Mapping, objective_cfg: Mapping) -> None:
    """Raises a UserError naming the valid objectives when the pair cannot train together."""
    family, objective = family_of(model_cfg), objective_name(objective_cfg)
    if family not in VALID_OBJECTIVES:
        raise UserError(f"model.family={family!r} is not known: choose one of {', '.join(VALID_OBJECTIVES)}")
    valid = VALID_OBJECTIVES[family]
    if objective not in valid:
        raise IncompatiblePair(f"objective={objective} cannot train model family {family}: "
                        f"valid objectives for {family} are {', '.join(valid)}")


def valid_pairs() -> list[tuple[str, str]]:
    """Every (family, objective) pair that trains (bidirectional recurrent variants included)."""
    return [(family, objective) for family, objectives in VALID_OBJECTIVES.items() for objective in objectives]
