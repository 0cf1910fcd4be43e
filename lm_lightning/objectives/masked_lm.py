"""Masked language modelling (Devlin et al. 2019), alone or with next-sentence prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lm_lightning.models.base import Trait
from lm_lightning.objectives.base import Objective, ObjectiveOutput, hits, output, token_nll
from lm_lightning.objectives.noise_bert import mask_tokens, next_sentence_pairs


class MaskedLM(Objective):
    """Selects ``mask_prob`` of the tokens of each window (B, T) — of those 80% become [MASK], 10% a
    random token, 10% stay — and predicts the originals from both sides. Reports masked-token accuracy."""

    name = "mlm"
    requires = frozenset({Trait.BIDIRECTIONAL})
    accuracy_names = ("masked_accuracy",)
    uses_special_tokens = True

    def __init__(self, mask_prob: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1,
                 vocab_size: int | None = None) -> None:
        super().__init__(vocab_size)
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"objective.mask_prob={mask_prob} must be in (0, 1)")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise ValueError("objective.mask_fraction + objective.random_fraction must be within [0, 1]")
        self.mask_prob, self.mask_fraction, self.random_fraction = mask_prob, mask_fraction, random_fraction

    def _mask(self, ids: torch.Tensor, generator: torch.Generator | None, maskable: torch.Tensor | None = None):
        return mask_tokens(ids, self.special, generator, mask_prob=self.mask_prob, mask_fraction=self.mask_fraction,
                           random_fraction=self.random_fraction, maskable=maskable)

    def __call__(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        inputs, labels = self._mask(batch[:, :-1], generator)
        logits = model(inputs)
        nll, n_tokens = token_nll(logits, labels)
        return output(nll, n_tokens, masked_accuracy=hits(logits, labels))


class MaskedLMWithNSP(MaskedLM):
    """BERT's pre-training: ``[CLS] A [SEP] B [SEP]`` pairs where B follows A in the text half of the
    time (``true_prob``) and comes from another window otherwise; masked LM on the text tokens plus
    a binary next-sentence loss on the [CLS] output. Reports masked-token and NSP accuracy. The
    reported loss and perplexity are the masked-LM part; the optimised loss adds the NSP cross-entropy."""

    name = "mlm_nsp"
    requires = frozenset({Trait.BIDIRECTIONAL, Trait.SENTENCE_PAIR})
    accuracy_names = ("masked_accuracy", "nsp_accuracy")

    def __init__(self, true_prob: float = 0.5, nsp_weight: float = 1.0, **mlm) -> None:
        super().__init__(**mlm)
        self.true_prob, self.nsp_weight = true_prob, nsp_weight

    def __call__(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        pairs, segments, is_next, maskable = next_sentence_pairs(batch[:, :-1], self.special, generator,
                                                                 true_prob=self.true_prob)
        inputs, labels = self._mask(pairs, generator, maskable)
        logits, nsp_logits = model(inputs, segment_ids=segments, return_pooled=True)
        nll, n_tokens = token_nll(logits, labels)
        out = output(nll, n_tokens, masked_accuracy=hits(logits, labels), nsp_accuracy=hits(nsp_logits, is_next))
        out.loss = out.loss + self.nsp_weight * F.cross_entropy(nsp_logits.float(), is_next)
        return out
