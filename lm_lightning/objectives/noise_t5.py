"""T5's input corruption (Raffel et al. 2020): span corruption, where noise spans of the input become
sentinels and the targets spell the spans out (``fill_spans`` undoes it), and the prefix-LM split
points of §3.2.3. Pure torch, no model; randomness and padding follow ``noise_common.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lm_lightning.objectives.noise_common import rand, randint
from lm_lightning.objectives.special_tokens import SpecialTokens


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(num_noise, num_spans) of T5's random_spans_noise_mask for a row of `length` ≥ 2 tokens.

    Python's round, like np.round, rounds halves to even. num_spans is capped at the number of kept
    tokens so that every noise span follows at least one kept token (T5 silently breaks otherwise).
    """
    if length < 2:
        raise ValueError(f"span corruption needs rows of ≥ 2 tokens, got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span_length))
    return num_noise, min(num_spans, length - num_noise)


def _random_segmentation(
    n_rows: int, n_items: int, n_segments: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """(n_rows, n_segments) lengths: per row a uniformly random split of n_items into positive parts.

    Equivalent to T5's _random_segmentation: n_segments - 1 distinct cut points among the n_items - 1 gaps.
    """
    scores = rand((n_rows, n_items - 1), generator, device)
    cuts = scores.argsort(dim=1)[:, : n_segments - 1].sort(dim=1).values + 1
    first = torch.zeros(n_rows, 1, dtype=cuts.dtype, device=cuts.device)
    edges = torch.cat([first, cuts, first + n_items], dim=1)
    return edges.diff(dim=1)


def _collapse_spans(ids: Tensor, in_span: Tensor, sentinel: Tensor, eos_id: int) -> Tensor:
    """T5's noise_span_to_unique_sentinel, then eos: each run of `in_span` becomes its `sentinel` id.

    ids, in_span, sentinel: (B, T); every row must keep the same number of tokens. Returns (B, kept + 1).
    """
    previous = torch.cat([torch.zeros_like(in_span[:, :1]), in_span[:, :-1]], dim=1)
    keep = ~in_span | ~previous  # tokens outside spans and the first token of each span
    rows = torch.where(in_span, sentinel, ids)[keep].view(len(ids), -1)
    return torch.cat([rows, torch.full_like(rows[:, :1], eos_id)], dim=1)


def span_corruption(
    ids: Tensor,
    special: SpecialTokens,
    generator: torch.Generator | None,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """T5 span corruption (Raffel et al. 2020, §3.1.4 and §3.3.4; T5's random_spans_noise_mask).

    Per row, num_noise = round(T · noise_density) tokens (at least 1, at most T - 1) fall in num_spans =
    max(1, round(num_noise / mean_span_length)) spans; noise and kept lengths are each a uniformly random
    partition into num_spans positive parts, interleaved kept span first.

    ids: (B, T). Returns
      inputs (B, T - num_noise + num_spans + 1): kept tokens, noise span i replaced by sentinel(i), then eos;
      targets (B, num_noise + num_spans + 1): sentinel(i) followed by span i's tokens for each span, then eos.
    All rows have the same length (the counts depend only on T), so there is no padding.
    Raises ValueError when num_spans > special.n_sentinels.
    """
    n_rows, T = ids.shape
    num_noise, num_spans = span_counts(T, noise_density, mean_span_length)
    if num_spans > special.n_sentinels:
        raise ValueError(
            f"span corruption of {T} tokens at density {noise_density} and mean span {mean_span_length} makes "
            f"{num_spans} spans but there are only {special.n_sentinels} sentinels"
        )
    noise_lengths = _random_segmentation(n_rows, num_noise, num_spans, generator, ids.device)
    kept_lengths = _random_segmentation(n_rows, T - num_noise, num_spans, generator, ids.device)
    interleaved = torch.stack([kept_lengths, noise_lengths], dim=2).flatten(1)  # (B, 2·num_spans)
    positions = torch.arange(T, device=ids.device).expand(n_rows, T).contiguous()
    span = torch.searchsorted(interleaved.cumsum(1), positions, right=True)  # (B, T): kept 2i, noise 2i + 1
    noise = span % 2 == 1
    sentinel = special.first_sentinel_id + span // 2  # kept span i precedes noise span i: both map to sentinel(i)
    inputs = _collapse_spans(ids, noise, sentinel, special.eos_id)
    targets = _collapse_spans(ids, ~noise, sentinel, special.eos_id)
    return inputs, targets


def fill_spans(inputs_row: Sequence[int], targets_row: Sequence[int], special: SpecialTokens) -> list[int]:
    """Undo span corruption for one row: each sentinel in the input becomes its span from the targets.

    eos and pad are dropped; the result is the original row. Raises ValueError on a malformed target.
    """
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for token in targets_row:
        if token in (special.eos_id, special.pad_id):
            break
        if special.is_sentinel(token):
            current = spans[token] = []
        elif current is None:
            raise ValueError("span-corruption targets must start with a sentinel")
        else:
            current.append(token)
    original: list[int] = []
    for token in inputs_row:
        if special.is_sentinel(token):
            original.extend(spans[token])
        elif token not in (special.eos_id, special.pad_id):
            original.append(token)
    return original


def prefix_split(ids: Tensor, generator: torch.Generator | None, min_prefix: int = 1) -> Tensor:
    """Prefix-LM split points (Raffel et al. 2020, §3.2.3): (B,) prefix lengths uniform in [min_prefix, T - 1].

    The prefix is ids[b, :p], the predicted suffix ids[b, p:] — at least one token.
    """
    n_rows, T = ids.shape
    if not 0 <= min_prefix <= T - 1:
        raise ValueError(f"min_prefix {min_prefix} leaves no split point in rows of {T} tokens")
    return randint(min_prefix, T, (n_rows,), generator, ids.device)
