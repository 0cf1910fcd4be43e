"""Encoder-decoder denoising objectives: T5 span corruption (Raffel et al. 2020), BART denoising
(Lewis et al. 2020) and UL2's mixture of denoisers (Tay et al. 2022).

Each corrupts windows (B, T) into encoder inputs and decoder targets (right-padded), and the loss
is the decoder's teacher-forced cross-entropy over the non-padding targets. Windows are cut to
``block_size − 2`` tokens so the added mode, sentinel and end-of-sequence tokens always fit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lm_lightning.models.base import Trait
from lm_lightning.objectives.base import IGNORE, Objective, ObjectiveOutput, output, token_nll
from lm_lightning.objectives.noise_bart import bart_noise
from lm_lightning.objectives.noise_t5 import span_corruption
from lm_lightning.objectives.noise_ul2 import ul2_denoise


class Seq2SeqObjective(Objective):
    requires = frozenset({Trait.ENCODER_DECODER})
    uses_special_tokens = True

    def corrupt(self, ids: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None) -> ObjectiveOutput:
        inputs, targets = self.corrupt(batch[:, : batch.size(1) - 3], generator)
        pad = self.special.pad_id
        # the decoder reads the targets shifted right, after the model's start token (T5: pad; BART: <s>)
        start = getattr(model.config, "decoder_start_id", None)
        start = pad if start is None else start
        decoder_in = torch.cat([targets.new_full((targets.size(0), 1), start), targets[:, :-1]], dim=1)
        nll, n_tokens = token_nll(model(inputs, decoder_in), targets.masked_fill(targets == pad, IGNORE))
        return output(nll, n_tokens)


class SpanCorruption(Seq2SeqObjective):
    """T5: ``noise_density`` of the tokens, in spans of mean length ``mean_span_length``, each
    replaced by one sentinel; the decoder writes each sentinel followed by its span."""

    name = "span_corruption"

    def __init__(self, noise_density: float = 0.15, mean_span_length: float = 3.0, n_sentinels: int = 100,
                 vocab_size: int | None = None) -> None:
        super().__init__(vocab_size, n_sentinels)
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"objective.noise_density={noise_density} must be in (0, 1)")
        if mean_span_length < 1:
            raise ValueError(f"objective.mean_span_length={mean_span_length} must be at least 1")
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def corrupt(self, ids, generator):
        return span_corruption(ids, self.special, generator, noise_density=self.noise_density,
                               mean_span_length=self.mean_span_length)


class BartDenoising(Seq2SeqObjective):
    """BART: text infilling (Poisson(λ) spans, each one [MASK], until ``mask_ratio`` of the tokens are
    covered), optional sentence permutation and token deletion; the decoder writes the original text."""

    name = "bart_denoising"

    def __init__(self, mask_ratio: float = 0.3, poisson_lambda: float = 3.0, permute_sentences: bool = True,
                 deletion_prob: float = 0.0, sentence_end_ids: Sequence[int] | None = None,
                 vocab_size: int | None = None) -> None:
        super().__init__(vocab_size)
        self.mask_ratio, self.poisson_lambda = mask_ratio, poisson_lambda
        self.permute_sentences, self.deletion_prob = permute_sentences, deletion_prob
        self.sentence_end_ids = tuple(sentence_end_ids or ())

    def corrupt(self, ids, generator):
        return bart_noise(ids, self.special, generator, mask_ratio=self.mask_ratio, poisson_lambda=self.poisson_lambda,
                          permute_sentences=self.permute_sentences and bool(self.sentence_end_ids),
                          sentence_end_ids=self.sentence_end_ids, deletion_prob=self.deletion_prob)


class UL2(Seq2SeqObjective):
    """UL2's mixture of denoisers: each window draws R (regular span corruption), S (sequential,
    prefix → suffix) or X (extreme span corruption) by ``mixture`` weight, and its encoder input
    starts with that denoiser's mode token."""

    name = "ul2"

    def __init__(self, mixture: Mapping[str, float] | None = None, denoisers: Mapping[str, Mapping] | None = None,
                 n_sentinels: int = 100, vocab_size: int | None = None) -> None:
        super().__init__(vocab_size, n_sentinels)
        self.mixture = dict(mixture) if mixture else None
        self.denoisers = {k: dict(v) for k, v in denoisers.items()} if denoisers else None

    def corrupt(self, ids, generator):
        inputs, targets, _ = ul2_denoise(ids, self.special, generator, mixture=self.mixture, denoisers=self.denoisers)
        return inputs, targets
