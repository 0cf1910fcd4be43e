"""Input/target transforms of the denoising pre-training objectives (pure torch, no model).

Masked LM and next-sentence pairs (BERT; Devlin et al. 2019), span corruption (T5; Raffel et al. 2020),
text infilling with sentence permutation and token deletion (BART; Lewis et al. 2020), prefix-LM split
points and the mixture of denoisers (UL2; Tay et al. 2022).

Every function draws all its randomness from the `generator` it is given, on the generator's device, so a
seed fixes the output whatever the device of `ids` (generator=None draws from torch's global RNG on the
device of `ids`); results are on the device of `ids`. Outputs are right-padded with `special.pad_id`;
label positions that carry no loss hold IGNORE_INDEX.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the objective's extra tokens, appended after the tokenizer's vocabulary V.

    mask_id = V, cls_id = V + 1, sep_id = V + 2, mode_id("R" | "S" | "X") = V + 3 | V + 4 | V + 5,
    sentinel(i) = V + 6 + i for i < n_sentinels; total_vocab = V + 6 + n_sentinels (the model's vocab size).
    """

    vocab_size: int  # tokenizer vocabulary V
    n_sentinels: int = 100
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3
    first_text_id: int = 4  # ids below this are tokenizer specials (pad/unk/bos/eos)

    MODES: ClassVar[str] = "RSX"  # UL2 paradigm tokens: regular, sequential, extreme

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def cls_id(self) -> int:
        return self.vocab_size + 1

    @property
    def sep_id(self) -> int:
        return self.vocab_size + 2

    def mode_id(self, mode: str) -> int:
        if mode not in self.MODES or len(mode) != 1:
            raise ValueError(f"unknown UL2 mode {mode!r}: expected one of {list(self.MODES)}")
        return self.vocab_size + 3 + self.MODES.index(mode)

    @property
    def first_sentinel_id(self) -> int:
        return self.vocab_size + 6

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.n_sentinels:
            raise ValueError(f"sentinel index {i} outside [0, {self.n_sentinels})")
        return self.first_sentinel_id + i

    def is_sentinel(self, token: int) -> bool:
        return self.first_sentinel_id <= token < self.total_vocab

    @property
    def total_vocab(self) -> int:
        return self.first_sentinel_id + self.n_sentinels


def _draw_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random numbers are drawn: the generator's device, or `device` for torch's global RNG."""
    return generator.device if generator is not None else device


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on `device`."""
    return torch.rand(tuple(shape), generator=generator, device=_draw_device(generator, device)).to(device)


def _randint(
    low: int, high: int, shape: Sequence[int], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform integers in [low, high) drawn on the generator's device, returned on `device`."""
    draw_device = _draw_device(generator, device)
    return torch.randint(low, high, tuple(shape), generator=generator, device=draw_device).to(device)


def _pad_rows(rows: list[Tensor], pad_id: int) -> Tensor:
    """Stack 1-D rows of different lengths into (len(rows), longest), right-padded with pad_id."""
    return pad_sequence(rows, batch_first=True, padding_value=pad_id)


# --- BERT: masked LM and next-sentence pairs ---------------------------------------------------------------


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
    selected = (_rand(ids.shape, generator, ids.device) < mask_prob) & maskable
    action = _rand(ids.shape, generator, ids.device)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    random_ids = _randint(special.first_text_id, special.vocab_size, ids.shape, generator, ids.device)
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
    is_next = _rand((n_rows,), generator, device) < true_prob
    row = torch.arange(n_rows, device=device)
    other_row = (row + _randint(1, n_rows, (n_rows,), generator, device)) % n_rows  # never the row itself
    offset = _randint(0, T - L + 1, (n_rows,), generator, device)
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


# --- T5: span corruption -----------------------------------------------------------------------------------


def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
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
    scores = _rand((n_rows, n_items - 1), generator, device)
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
    num_noise, num_spans = _span_counts(T, noise_density, mean_span_length)
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


# --- BART: text infilling, sentence permutation, token deletion ---------------------------------------------


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
    device = _draw_device(generator, torch.device("cpu"))
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
    order = torch.randperm(len(sentences), generator=generator, device=_draw_device(generator, row.device)).tolist()
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
            row = row[_rand(row.shape, generator, row.device) >= deletion_prob]
        spans = infilling_spans(len(row), generator, mask_ratio, poisson_lambda)
        rows.append(torch.cat([text_infilling(row, spans, special.mask_id), eos]))
    targets = torch.cat([ids, eos.expand(len(ids), 1)], dim=1)
    return _pad_rows(rows, special.pad_id), targets


# --- prefix LM and UL2 ---------------------------------------------------------------------------------------


def prefix_split(ids: Tensor, generator: torch.Generator | None, min_prefix: int = 1) -> Tensor:
    """Prefix-LM split points (Raffel et al. 2020, §3.2.3): (B,) prefix lengths uniform in [min_prefix, T - 1].

    The prefix is ids[b, :p], the predicted suffix ids[b, p:] — at least one token.
    """
    n_rows, T = ids.shape
    if not 0 <= min_prefix <= T - 1:
        raise ValueError(f"min_prefix {min_prefix} leaves no split point in rows of {T} tokens")
    return _randint(min_prefix, T, (n_rows,), generator, ids.device)


DEFAULT_MIXTURE: dict[str, float] = {"R": 0.5, "S": 0.25, "X": 0.25}
DEFAULT_DENOISERS: dict[str, dict[str, Any]] = {
    "R": {"noise_density": 0.15, "mean_span_length": 3.0},
    "X": {"noise_density": 0.5, "mean_span_length": 32.0},
    "S": {"min_prefix": 1},
}


def ul2_denoise(
    ids: Tensor,
    special: SpecialTokens,
    generator: torch.Generator | None,
    mixture: Mapping[str, float] | None = None,
    denoisers: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """UL2 mixture of denoisers (Tay et al. 2022, §3.1).

    Each row draws one denoiser name from `mixture` (name → weight, normalised; default DEFAULT_MIXTURE).
    A name's settings come from `denoisers`, which replaces DEFAULT_DENOISERS entries name by name:
      mode: its paradigm token "R", "S" or "X" (default: the name itself, so a name such as "X64" needs it);
      mode "S": sequential denoising (prefix LM): split by `prefix_split` with `min_prefix`, inputs = the
        prefix, targets = the suffix then eos;
      mode "R" / "X": `span_corruption` with `noise_density` and `mean_span_length` — the mean is raised
        where a row would otherwise need more than special.n_sentinels spans.
    Inputs start with mode_id(mode). Randomness: the draw of denoisers, then each name's rows in mixture order.

    ids: (B, T). Returns inputs (B, S_in) and targets (B, S_out), right-padded, and modes (B,) long: the
    index of each row's denoiser in list(mixture).
    """
    mixture = dict(DEFAULT_MIXTURE if mixture is None else mixture)
    table = {**DEFAULT_DENOISERS, **(denoisers or {})}
    names = list(mixture)
    if unknown := [name for name in names if name not in table]:
        raise ValueError(f"no settings for denoisers {unknown}: pass them in `denoisers`")
    n_rows, T = ids.shape
    weights = torch.tensor([float(mixture[name]) for name in names], device=_draw_device(generator, ids.device))
    modes = torch.multinomial(weights, n_rows, replacement=True, generator=generator).to(ids.device)
    inputs: list[Tensor] = [ids.new_empty(0)] * n_rows
    targets: list[Tensor] = [ids.new_empty(0)] * n_rows
    for k, name in enumerate(names):
        rows = (modes == k).nonzero().flatten()
        if len(rows) == 0:
            continue
        settings = dict(table[name])
        mode = settings.pop("mode", name)
        mode_token = ids.new_full((1,), special.mode_id(mode))
        if mode == "S":
            prefix = prefix_split(ids[rows], generator, **settings).tolist()
            eos = ids.new_full((1,), special.eos_id)
            for r, p in zip(rows.tolist(), prefix):
                inputs[r] = torch.cat([mode_token, ids[r, :p]])
                targets[r] = torch.cat([ids[r, p:], eos])
        else:
            density, mean = settings["noise_density"], settings["mean_span_length"]
            num_noise, _ = _span_counts(T, density, mean)
            mean = max(mean, num_noise / special.n_sentinels)  # at most n_sentinels spans on long rows
            corrupted, spans = span_corruption(ids[rows], special, generator, density, mean)
            for i, r in enumerate(rows.tolist()):
                inputs[r] = torch.cat([mode_token, corrupted[i]])
                targets[r] = spans[i]
    return _pad_rows(inputs, special.pad_id), _pad_rows(targets, special.pad_id), modes
