"""BERT's input corruption (Devlin et al. 2019, §3.1): masked-LM masking with the 80/10/10 split of
mask, random and unchanged tokens, and next-sentence-prediction pairs ``[CLS] A [SEP] B [SEP]`` with
their segment ids and the positions that may be masked. Pure torch, no model; randomness and
padding follow ``noise_common.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lm_lightning.objectives.noise_common import rand, randint
from lm_lightning.objectives.special_tokens import IGNORE_INDEX, SpecialTokens


def mask_tokens(
    ids: Tensor,
    special: SpecialTokens,
    generator: torch.Generator | None,
    mask_prob: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    maskable: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masked-LM corruption (Devlin et al. 2019, §3.1 and appendix A.1).

    Each maskable token is selected with probability `mask_prob`; a selected token becomes mask_id with
    probability `mask_fraction`, a uniformly random text id in [first_text_id, vocab_size) with probability
    `random_fraction` (it may draw the original id), and is left unchanged otherwise.

    ids: (B, T). maskable: (B, T) bool, default ids >= first_text_id (never a tokenizer special).
    Returns inputs (B, T) and labels (B, T): the original id at selected positions, IGNORE_INDEX elsewhere.
    """
    if not (0 <= mask_fraction and 0 <= random_fraction and mask_fraction + random_fraction <= 1):
        raise ValueError(f"mask_fraction {mask_fraction} and random_fraction {random_fraction} must sum to ≤ 1")
    if maskable is None:
        maskable = ids >= special.first_text_id
    selected = (rand(ids.shape, generator, ids.device) < mask_prob) & maskable
    action = rand(ids.shape, generator, ids.device)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    random_ids = randint(special.first_text_id, special.vocab_size, ids.shape, generator, ids.device)
    inputs = torch.where(to_mask, special.mask_id, ids)
    inputs = torch.where(to_random, random_ids, inputs)
    labels = torch.where(selected, ids, IGNORE_INDEX)
    return inputs, labels


def next_sentence_pairs(
    ids: Tensor, special: SpecialTokens, generator: torch.Generator | None, true_prob: float = 0.5
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Next-sentence-prediction pairs `[CLS] A [SEP] B [SEP]` (Devlin et al. 2019, §3.1, task #2).

    A is the first L = (T - 3) // 2 tokens of each row. With probability `true_prob` B is the next L tokens
    of the same row (label 1, "is next"); otherwise B is L consecutive tokens at a uniform offset in another,
    uniformly chosen row of the batch (label 0). The pair fills 2L + 3 positions: one pad ends it when
    T - 3 is odd.

    ids: (B, T), B ≥ 2, T ≥ 5. Returns
      inputs (B, T);
      segment_ids (B, T): 0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding;
      nsp_labels (B,) long, 1 where B continues A;
      maskable (B, T) bool: the text tokens of A and B — pass it to `mask_tokens` so that [CLS], [SEP]
      and padding are never masked.
    """
    n_rows, T = ids.shape
    if n_rows < 2:
        raise ValueError(f"next_sentence_pairs draws the random B from another row: needs ≥ 2 rows, got {n_rows}")
    L = (T - 3) // 2
    if L < 1:
        raise ValueError(f"next_sentence_pairs needs rows of ≥ 5 tokens for [CLS] A [SEP] B [SEP], got {T}")
    device = ids.device
    is_next = rand((n_rows,), generator, device) < true_prob
    row = torch.arange(n_rows, device=device)
    other_row = (row + randint(1, n_rows, (n_rows,), generator, device)) % n_rows  # never the row itself
    offset = randint(0, T - L + 1, (n_rows,), generator, device)
    source_row = torch.where(is_next, row, other_row)
    start = torch.where(is_next, L, offset)
    b = ids[source_row[:, None], start[:, None] + torch.arange(L, device=device)]  # (B, L)

    def column(token: int, width: int = 1) -> Tensor:
        return torch.full((n_rows, width), token, dtype=ids.dtype, device=device)

    sep = column(special.sep_id)
    inputs = torch.cat([column(special.cls_id), ids[:, :L], sep, b, sep, column(special.pad_id, T - 2 * L - 3)], 1)
    segment_ids = torch.zeros_like(inputs)
    segment_ids[:, L + 2 : 2 * L + 3] = 1
    text = torch.zeros_like(inputs, dtype=torch.bool)
    text[:, 1 : L + 1] = True
    text[:, L + 2 : 2 * L + 2] = True
    maskable = text & (inputs >= special.first_text_id)
    return inputs, segment_ids, is_next.long(), maskable
