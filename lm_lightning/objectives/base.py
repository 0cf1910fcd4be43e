"""What every pre-training objective shares: its output, the token-level loss, and the extra vocabulary.

An objective is a callable ``objective(model, batch, generator) -> ObjectiveOutput``: it turns a
batch of packed text windows (B, T + 1) into the model's inputs and targets (its "collator"),
runs the model and scores the predicted tokens (its loss). Randomness (masks, spans, splits)
comes from ``generator``, so a validation pass can fix it and a resumed run repeats it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.models.base import Trait
from lm_lightning.objectives.special_tokens import SpecialTokens

IGNORE = -100  # target id excluded from the loss


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor  # mean negative log-likelihood over predicted tokens (plus any auxiliary term), nats
    nll_sum: torch.Tensor  # summed NLL over predicted tokens, nats (detached)
    n_tokens: torch.Tensor  # number of predicted tokens
    #: name -> (hits, total) for accuracies the objective reports (masked tokens, NSP)
    accuracies: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats) of (…, V) logits against (…) targets, and the count of scored
    targets (those not equal to ``IGNORE``)."""
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return nll, (targets != IGNORE).sum()


def output(nll: torch.Tensor, n_tokens: torch.Tensor, **accuracies: tuple[torch.Tensor, torch.Tensor]) -> ObjectiveOutput:
    return ObjectiveOutput(loss=nll / n_tokens.clamp(min=1), nll_sum=nll.detach(), n_tokens=n_tokens,
                           accuracies=accuracies)


def hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct argmax predictions, scored targets) over the targets that are not ``IGNORE``."""
    scored = targets != IGNORE
    return ((logits.argmax(-1) == targets) & scored).sum(), scored.sum()


class Objective:
    """Base of the objectives. Subclasses set the class attributes and implement ``__call__``."""

    name = "objective"
    #: what it needs from a model: a family trains with it when the family meets all of these (models/capabilities.py)
    requires: frozenset[Trait]
    #: bits-per-byte is defined: the predicted tokens are the text itself, each in context
    bits_per_byte = False
    #: names of the accuracies in ``ObjectiveOutput.accuracies``
    accuracy_names: tuple[str, ...] = ()
    #: the objective adds [MASK]/[CLS]/[SEP], mode and sentinel tokens after the tokenizer's vocabulary
    uses_special_tokens = False

    def __init__(self, vocab_size: int | None = None, n_sentinels: int = 100) -> None:
        """``vocab_size``: the tokenizer's vocabulary V (filled in by training); the model's is
        ``model_vocab_size(V)``."""
        self.vocab_size = vocab_size
        self.n_sentinels = n_sentinels

    @property
    def special(self) -> SpecialTokens:
        if self.vocab_size is None:
            raise RuntimeError(f"objective {self.name} needs the tokenizer's vocab_size")
        return SpecialTokens(self.vocab_size, n_sentinels=self.n_sentinels)

    def model_vocab_size(self, tokenizer_vocab: int) -> int:
        """The model's vocabulary: the tokenizer's, plus this objective's extra tokens."""
        return SpecialTokens(tokenizer_vocab, n_sentinels=self.n_sentinels).total_vocab if self.uses_special_tokens \
            else tokenizer_vocab

    def __call__(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        raise NotImplementedError
