"""BART's input corruption (Lewis et al. 2020, §2.2): text infilling (Poisson-length spans, each
replaced by one mask), sentence permutation and token deletion, composed row by row by ``bart_noise``;
``fill_masks`` undoes the infilling. Pure torch, no model; randomness and padding follow
``noise_common.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lm_lightning.objectives.noise_common import draw_device, pad_rows, rand
from lm_lightning.objectives.special_tokens import SpecialTokens


def infilling_spans(
    n_tokens: int, generator: torch.Generator | None, mask_ratio: float = 0.3, poisson_lambda: float = 3.0
) -> list[tuple[int, int]]:
    """BART text-infilling spans over a row of `n_tokens` (Lewis et al. 2020, §2.2).

    Span lengths are drawn from Poisson(λ) until they cover budget = ceil(mask_ratio · n_tokens) tokens; the
    span that crosses the budget is cut to it (as fairseq's DenoisingDataset). 0-length spans are kept: each
    inserts a mask. The spans are shuffled and laid out uniformly at random without overlap.

    Returns (start, length) pairs, sorted by start, covering exactly `budget` tokens; 0 ≤ start ≤ n_tokens.
    """
    if not 0 <= mask_ratio <= 1 or poisson_lambda <= 0:
        raise ValueError(f"need 0 ≤ mask_ratio ≤ 1 and poisson_lambda > 0, got {mask_ratio}, {poisson_lambda}")
    budget = math.ceil(n_tokens * mask_ratio)
    if budget == 0:
        return []
    device = draw_device(generator, torch.device("cpu"))
    rate = torch.full((budget,), float(poisson_lambda), device=device)
    lengths = torch.poisson(rate, generator).long()
    while lengths.sum() < budget:
        lengths = torch.cat([lengths, torch.poisson(rate, generator).long()])
    covered = lengths.cumsum(0)
    n_spans = int((covered < budget).sum()) + 1  # up to the first span that reaches the budget
    lengths = lengths[:n_spans].clone()
    lengths[-1] -= covered[n_spans - 1] - budget
    lengths = lengths[torch.randperm(n_spans, generator=generator, device=device)]
    # Spread the n_tokens - budget unmasked tokens uniformly around the spans: among n_free + n_spans slots,
    # the sorted slot of span i has slot_i - i unmasked tokens before it.
    n_free = n_tokens - budget
    slots = torch.randperm(n_free + n_spans, generator=generator, device=device)[:n_spans].sort().values
    starts = slots - torch.arange(n_spans, device=device) + lengths.cumsum(0) - lengths
    return list(zip(starts.tolist(), lengths.tolist()))


def text_infilling(row: Tensor, spans: Sequence[tuple[int, int]], mask_id: int) -> Tensor:
    """Replace each (start, length) span of `row` (n,) by one mask_id (a 0-length span inserts one)."""
    pieces, previous = [], 0
    mask = row.new_full((1,), mask_id)
    for start, length in spans:
        pieces += [row[previous:start], mask]
        previous = start + length
    pieces.append(row[previous:])
    return torch.cat(pieces)


def fill_masks(inputs_row: Sequence[int], spans_tokens: Sequence[Sequence[int]], special: SpecialTokens) -> list[int]:
    """Undo text infilling for one row: the k-th mask becomes spans_tokens[k]; eos and pad are dropped."""
    if sum(token == special.mask_id for token in inputs_row) != len(spans_tokens):
        raise ValueError(f"{len(spans_tokens)} spans for a row with a different number of masks")
    spans = iter(spans_tokens)
    original: list[int] = []
    for token in inputs_row:
        if token == special.mask_id:
            original.extend(next(spans))
        elif token not in (special.eos_id, special.pad_id):
            original.append(token)
    return original


def sentence_permutation(row: Tensor, sentence_end_ids: Sequence[int], generator: torch.Generator | None) -> Tensor:
    """Split `row` (n,) after every token in `sentence_end_ids` and shuffle the sentences (Lewis et al. 2020)."""
    is_end = torch.isin(row, torch.tensor(list(sentence_end_ids), dtype=row.dtype, device=row.device))
    cuts = (is_end.nonzero().flatten() + 1).tolist()
    sentences = [s for s in torch.tensor_split(row, cuts) if len(s)]
    order = torch.randperm(len(sentences), generator=generator, device=draw_device(generator, row.device)).tolist()
    return torch.cat([sentences[i] for i in order])


def bart_noise(
    ids: Tensor,
    special: SpecialTokens,
    generator: torch.Generator | None,
    mask_ratio: float = 0.3,
    poisson_lambda: float = 3.0,
    permute_sentences: bool = False,
    sentence_end_ids: Sequence[int] = (),
    deletion_prob: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """BART denoising (Lewis et al. 2020, §2.2), row by row.

    Optional sentence permutation (`sentence_permutation`), optional token deletion (each token dropped with
    probability `deletion_prob`), then text infilling (`infilling_spans` over the remaining tokens, each span
    replaced by ONE mask_id). Disabled steps draw nothing, so with infilling only, row b's spans are the b-th
    call of infilling_spans(T, generator, mask_ratio, poisson_lambda).

    ids: (B, T). Returns inputs (B, longest noised row + 1), ending in eos then right-padded, and
    targets (B, T + 1): the original row followed by eos.
    """
    if permute_sentences and not sentence_end_ids:
        raise ValueError("permute_sentences needs sentence_end_ids to split the rows into sentences")
    rows = []
    eos = ids.new_full((1,), special.eos_id)
    for row in ids:
        if permute_sentences:
            row = sentence_permutation(row, sentence_end_ids, generator)
        if deletion_prob > 0:
            row = row[rand(row.shape, generator, row.device) >= deletion_prob]
        spans = infilling_spans(len(row), generator, mask_ratio, poisson_lambda)
        rows.append(torch.cat([text_infilling(row, spans, special.mask_id), eos]))
    targets = torch.cat([ids, eos.expand(len(ids), 1)], dim=1)
    return pad_rows(rows, special.pad_id), targets
