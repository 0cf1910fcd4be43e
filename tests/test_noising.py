"""The denoising transforms as a specification: measured rates over ≥ 100,000 tokens match the papers'
settings (BERT 15% with 80/10/10, T5 density and mean span, BART Poisson(3) spans over 30%, UL2 mixture
frequencies), every corrupted row decodes back to the original, and a seed fixes every output."""

import math

import pytest
import torch

from lm_lightning.objectives.noise_bart import bart_noise, fill_masks, infilling_spans, text_infilling
from lm_lightning.objectives.noise_bert import mask_tokens, next_sentence_pairs
from lm_lightning.objectives.noise_t5 import fill_spans, prefix_split, span_corruption
from lm_lightning.objectives.noise_ul2 import ul2_denoise
from lm_lightning.objectives.special_tokens import IGNORE_INDEX, SpecialTokens

V = 1000
SPECIAL = SpecialTokens(vocab_size=V)
N_TEXT = V - SPECIAL.first_text_id  # 996 text ids


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def text(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    """(rows, length) uniformly random text ids in [first_text_id, V)."""
    return torch.randint(SPECIAL.first_text_id, V, (rows, length), generator=seeded(seed))


def test_special_token_layout():
    s = SpecialTokens(vocab_size=50, n_sentinels=3)
    assert (s.mask_id, s.cls_id, s.sep_id) == (50, 51, 52)
    assert [s.mode_id(m) for m in "RSX"] == [53, 54, 55]
    assert [s.sentinel(i) for i in range(3)] == [56, 57, 58]
    assert s.total_vocab == 59
    with pytest.raises(ValueError):
        s.sentinel(3)
    with pytest.raises(ValueError):
        s.mode_id("Q")


# --- BERT masked LM ------------------------------------------------------------------------------


def test_mlm_selects_15_percent_and_splits_80_10_10():
    ids = text(400, 512)  # 204,800 tokens
    inputs, labels = mask_tokens(ids, SPECIAL, seeded())
    selected = labels != IGNORE_INDEX
    n_selected = selected.sum().item()
    assert n_selected / ids.numel() == pytest.approx(0.15, abs=0.005)
    masked = selected & (inputs == SPECIAL.mask_id)
    randomised = selected & (inputs != ids) & (inputs != SPECIAL.mask_id)
    unchanged = selected & (inputs == ids)
    assert masked.sum().item() / n_selected == pytest.approx(0.8, abs=0.01)
    # a random draw equal to the original looks unchanged: 1/996 of the random 10% moves over
    assert randomised.sum().item() / n_selected == pytest.approx(0.1 * (1 - 1 / N_TEXT), abs=0.01)
    assert unchanged.sum().item() / n_selected == pytest.approx(0.1 + 0.1 / N_TEXT, abs=0.01)
    replacements = inputs[randomised]
    assert replacements.min() >= SPECIAL.first_text_id and replacements.max() < V
    assert replacements.unique().numel() > 900  # spread over the whole text vocabulary
    assert torch.equal(inputs[~selected], ids[~selected])


def test_mlm_never_selects_specials_and_labels_restore_the_input():
    ids = text(200, 512)
    specials = torch.rand(ids.shape, generator=seeded(2)) < 0.2
    ids[specials] = torch.randint(0, SPECIAL.first_text_id, (int(specials.sum()),), generator=seeded(3))
    inputs, labels = mask_tokens(ids, SPECIAL, seeded())
    assert (labels[specials] == IGNORE_INDEX).all() and torch.equal(inputs[specials], ids[specials])
    assert (labels[~specials] != IGNORE_INDEX).float().mean().item() == pytest.approx(0.15, abs=0.005)
    restored = torch.where(labels != IGNORE_INDEX, labels, inputs)
    assert torch.equal(restored, ids)


def test_mlm_maskable_overrides_the_default():
    ids = text(200, 512)
    maskable = torch.zeros_like(ids, dtype=torch.bool)
    maskable[:, :256] = True
    _, labels = mask_tokens(ids, SPECIAL, seeded(), maskable=maskable)
    assert (labels[:, 256:] == IGNORE_INDEX).all()
    assert (labels[:, :256] != IGNORE_INDEX).float().mean().item() == pytest.approx(0.15, abs=0.005)


# --- BERT next-sentence pairs --------------------------------------------------------------------


def test_nsp_half_true_and_layout():
    T, L = 22, 9  # L = (T - 3) // 2; T - 3 odd leaves one pad
    ids = text(12_000, T)
    inputs, segments, labels, maskable = next_sentence_pairs(ids, SPECIAL, seeded())
    assert labels.float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (inputs[:, 0] == SPECIAL.cls_id).all()
    assert (inputs[:, L + 1] == SPECIAL.sep_id).all() and (inputs[:, 2 * L + 2] == SPECIAL.sep_id).all()
    assert (inputs[:, 2 * L + 3 :] == SPECIAL.pad_id).all() and inputs.shape == (12_000, T)
    assert torch.equal(inputs[:, 1 : L + 1], ids[:, :L])
    expected_segments = torch.tensor([0] * (L + 2) + [1] * (L + 1) + [0] * (T - 2 * L - 3))
    assert torch.equal(segments, expected_segments.expand_as(segments))
    expected_maskable = torch.tensor([False] + [True] * L + [False] + [True] * L + [False] * (T - 2 * L - 2))
    assert torch.equal(maskable, expected_maskable.expand_as(maskable))


def test_nsp_true_b_continues_a_and_false_b_comes_from_another_row():
    T, L = 21, 9
    ids = text(2_000, T)
    inputs, _, labels, _ = next_sentence_pairs(ids, SPECIAL, seeded())
    b = inputs[:, L + 2 : 2 * L + 2]
    is_next = labels == 1
    assert torch.equal(b[is_next], ids[is_next, L : 2 * L])
    assert (b[~is_next] != ids[~is_next, L : 2 * L]).any(dim=1).all()
    windows = ids.unfold(1, L, 1)  # (rows, T - L + 1, L): every L-token window of every row
    for row in (~is_next).nonzero().flatten()[:50].tolist():
        found = (windows == b[row]).all(dim=2).nonzero()[:, 0]
        assert len(found) and (found != row).all()


def test_nsp_random_b_never_comes_from_its_own_row():
    T, L = 21, 9
    ids = text(2, T)
    generator = seeded()
    for _ in range(200):  # with two rows the random B must always come from the other one
        inputs, _, labels, _ = next_sentence_pairs(ids, SPECIAL, generator, true_prob=0.0)
        assert (labels == 0).all()
        for row in (0, 1):
            b = inputs[row, L + 2 : 2 * L + 2]
            assert (ids[1 - row].unfold(0, L, 1) == b).all(dim=1).any()


def test_nsp_needs_two_rows():
    with pytest.raises(ValueError, match="2 rows"):
        next_sentence_pairs(text(1, 20), SPECIAL, seeded())


# --- T5 span corruption --------------------------------------------------------------------------


def noise_mask(inputs: list[int], targets: list[int], special: SpecialTokens) -> list[bool]:
    """The positions of the original row that span corruption hid, read back from its outputs."""
    span_lengths, current = {}, None
    for token in targets:
        if token == special.eos_id:
            break
        if special.is_sentinel(token):
            current = token
            span_lengths[token] = 0
        else:
            span_lengths[current] += 1
    mask = []
    for token in inputs:
        if special.is_sentinel(token):
            mask += [True] * span_lengths[token]
        elif token != special.eos_id:
            mask.append(False)
    return mask


@pytest.mark.parametrize("density, mean_span", [(0.15, 3.0), (0.5, 32.0)])
def test_span_corruption_density_and_mean_span_length(density, mean_span):
    ids = text(200, 512)
    inputs, targets = span_corruption(ids, SPECIAL, seeded(), density, mean_span)
    masks = torch.tensor([noise_mask(i, t, SPECIAL) for i, t in zip(inputs.tolist(), targets.tolist())])
    assert masks.shape == ids.shape
    n_spans = (inputs >= SPECIAL.first_sentinel_id).sum().item()
    assert masks.float().mean().item() == pytest.approx(density, rel=0.05)
    assert masks.sum().item() / n_spans == pytest.approx(mean_span, rel=0.05)
    # the spans are spread over the row, not piled at one end (a row starts with kept tokens: fewer early)
    for quarter in masks.float().chunk(4, dim=1):
        assert quarter.mean().item() == pytest.approx(density, rel=0.2)
    # span lengths vary (a random partition), and sentinels count up from sentinel(0)
    starts = masks & ~torch.nn.functional.pad(masks[:, :-1], (1, 0))
    assert starts.sum(1).unique().numel() == 1  # every row has the same number of spans
    first_row_sentinels = inputs[0][inputs[0] >= SPECIAL.first_sentinel_id]
    assert first_row_sentinels.tolist() == [SPECIAL.sentinel(i) for i in range(len(first_row_sentinels))]
    assert (inputs[:, -1] == SPECIAL.eos_id).all() and (targets[:, -1] == SPECIAL.eos_id).all()
    assert not torch.equal(masks[0], masks[1])


@pytest.mark.parametrize("T, n_noise, n_spans", [(2, 1, 1), (7, 1, 1), (64, 10, 3), (512, 77, 26)])
def test_span_corruption_round_trips_through_fill_spans(T, n_noise, n_spans):
    ids = text(100, T, seed=T)
    inputs, targets = span_corruption(ids, SPECIAL, seeded())
    # round(T · 0.15) noise tokens (at least 1) in round(n_noise / 3) spans (at least 1), plus eos
    assert inputs.shape == (100, T - n_noise + n_spans + 1) and targets.shape == (100, n_noise + n_spans + 1)
    for i, t, original in zip(inputs.tolist(), targets.tolist(), ids.tolist()):
        assert fill_spans(i, t, SPECIAL) == original


def test_span_corruption_needs_enough_sentinels():
    few = SpecialTokens(vocab_size=V, n_sentinels=10)  # 512 tokens at 0.15 / 3 make 26 spans
    with pytest.raises(ValueError, match="26 spans"):
        span_corruption(text(2, 512), few, seeded())


# --- BART -----------------------------------------------------------------------------------------


def test_infilling_span_lengths_are_poisson_3_over_30_percent():
    n = 100_000
    spans = infilling_spans(n, seeded(), mask_ratio=0.3, poisson_lambda=3.0)
    lengths = torch.tensor([length for _, length in spans], dtype=torch.float)
    assert lengths.mean().item() == pytest.approx(3.0, rel=0.05)
    assert lengths.var().item() == pytest.approx(3.0, rel=0.1)  # Poisson: variance = mean
    assert (lengths == 0).float().mean().item() == pytest.approx(math.exp(-3), abs=0.01)  # inserts
    assert lengths.sum().item() == math.ceil(0.3 * n)
    ends = [start + length for start, length in spans]
    assert all(end <= next_start for end, (next_start, _) in zip(ends, spans[1:]))  # sorted, no overlap
    assert spans[0][0] >= 0 and ends[-1] <= n
    starts = torch.tensor([start for start, _ in spans], dtype=torch.float)
    assert starts.mean().item() / n == pytest.approx(0.5, abs=0.02)  # spread over the whole row


def test_bart_infilling_covers_mask_ratio_and_round_trips():
    ids = text(200, 512)
    inputs, targets = bart_noise(ids, SPECIAL, seeded(), mask_ratio=0.3)
    assert torch.equal(targets[:, :-1], ids) and (targets[:, -1] == SPECIAL.eos_id).all()
    kept = (inputs >= SPECIAL.first_text_id) & (inputs < V)
    covered = 1 - kept.sum().item() / ids.numel()
    assert covered == pytest.approx(0.3, abs=0.005)
    assert ((inputs == SPECIAL.mask_id).sum(1) > 0).all()
    replay = seeded()  # bart_noise's documented draw order: one infilling_spans call per row
    for row_in, row in zip(inputs.tolist(), ids):
        spans = infilling_spans(len(row), replay)
        expected = text_infilling(row, spans, SPECIAL.mask_id).tolist() + [SPECIAL.eos_id]
        assert row_in[: len(expected)] == expected and set(row_in[len(expected) :]) <= {SPECIAL.pad_id}
        assert fill_masks(row_in, [row[s : s + n].tolist() for s, n in spans], SPECIAL) == row.tolist()


def test_fill_masks_inverts_text_infilling():
    generator = seeded()
    for row in text(300, 40):
        spans = infilling_spans(len(row), generator, mask_ratio=0.5, poisson_lambda=2.0)
        noised = text_infilling(row, spans, SPECIAL.mask_id).tolist()
        assert noised.count(SPECIAL.mask_id) == len(spans)
        assert fill_masks(noised, [row[s : s + n].tolist() for s, n in spans], SPECIAL) == row.tolist()


def sentences(row: list[int], end: int) -> list[tuple[int, ...]]:
    out, current = [], []
    for token in row:
        current.append(token)
        if token == end:
            out.append(tuple(current))
            current = []
    return out + [tuple(current)] * bool(current)


def test_bart_sentence_permutation_keeps_the_sentences():
    end = 4
    ids = text(200, 128)
    ids[torch.rand(ids.shape, generator=seeded(5)) < 0.05] = end  # ≈ 6 sentences a row
    ids[:, -1] = end  # whole sentences only: an unfinished last one would run into the next once moved
    inputs, _ = bart_noise(ids, SPECIAL, seeded(), mask_ratio=0.0, permute_sentences=True, sentence_end_ids=(end,))
    reordered = 0
    for row_in, row in zip(inputs.tolist(), ids.tolist()):
        shuffled = row_in[: row_in.index(SPECIAL.eos_id)]
        assert sorted(sentences(shuffled, end)) == sorted(sentences(row, end))
        reordered += shuffled != row
    assert reordered > 180  # a few rows have one sentence, or draw the identity


def test_bart_deletion_drops_deletion_prob_of_tokens():
    ids = text(200, 512)
    inputs, _ = bart_noise(ids, SPECIAL, seeded(), mask_ratio=0.0, deletion_prob=0.1)
    kept = (inputs >= SPECIAL.first_text_id).sum().item()
    assert 1 - kept / ids.numel() == pytest.approx(0.1, abs=0.005)
    for row_in, row in zip(inputs[:20].tolist(), ids[:20].tolist()):  # what is left keeps its order
        remaining = iter(row)
        assert all(token in remaining for token in row_in[: row_in.index(SPECIAL.eos_id)])


# --- prefix LM and UL2 --------------------------------------------------------------------------------


def test_prefix_split_is_uniform_over_its_range():
    lengths = prefix_split(text(16_000, 11), seeded(), min_prefix=3)
    counts = torch.bincount(lengths, minlength=11)
    assert counts[:3].sum() == 0 and counts[3:].min() > 0.9 * 2000 and counts[3:].max() < 1.1 * 2000
    with pytest.raises(ValueError):
        prefix_split(text(2, 11), seeded(), min_prefix=11)


def test_ul2_mode_frequencies_and_every_row_decodes():
    ids = text(12_000, 64)
    inputs, targets, modes = ul2_denoise(ids, SPECIAL, seeded())
    frequencies = torch.bincount(modes, minlength=3).float() / len(modes)
    assert frequencies.tolist() == pytest.approx([0.5, 0.25, 0.25], abs=0.02)  # list({"R", "S", "X"})
    assert torch.equal(inputs[:, 0], torch.tensor([SPECIAL.mode_id(m) for m in "RSX"])[modes])
    noise = {"R": [], "X": []}
    for row_in, row_out, mode, row in zip(inputs.tolist(), targets.tolist(), modes.tolist(), ids.tolist()):
        name = "RSX"[mode]
        if name == "S":
            prefix = [t for t in row_in[1:] if t != SPECIAL.pad_id]
            suffix = row_out[: row_out.index(SPECIAL.eos_id)]
            assert prefix + suffix == row and len(prefix) >= 1 and len(suffix) >= 1
        else:
            assert fill_spans(row_in[1:], row_out, SPECIAL) == row
            noise[name].append(sum(noise_mask(row_in[1:], row_out, SPECIAL)))
    assert sum(noise["R"]) / (64 * len(noise["R"])) == pytest.approx(0.15, rel=0.05)
    assert sum(noise["X"]) / (64 * len(noise["X"])) == pytest.approx(0.5, rel=0.05)


def test_ul2_custom_denoisers_and_sentinel_cap():
    few = SpecialTokens(vocab_size=V, n_sentinels=4)
    ids = text(64, 512)
    r8 = {"mode": "R", "noise_density": 0.15, "mean_span_length": 8}
    inputs, targets, modes = ul2_denoise(ids, few, seeded(), mixture={"R8": 1.0}, denoisers={"R8": r8})
    assert (modes == 0).all() and (inputs[:, 0] == few.mode_id("R")).all()
    n_spans = (inputs >= few.first_sentinel_id).sum(1)
    assert (n_spans == 4).all()  # 77 noise tokens would make 10 spans of 8: capped at the 4 sentinels
    for row_in, row_out, row in zip(inputs.tolist(), targets.tolist(), ids.tolist()):
        assert fill_spans(row_in[1:], row_out, few) == row
    with pytest.raises(ValueError, match="no settings"):
        ul2_denoise(ids, few, seeded(), mixture={"Q": 1.0})


# --- determinism -----------------------------------------------------------------------------------


TRANSFORMS = {
    "mask_tokens": lambda ids, g: mask_tokens(ids, SPECIAL, g),
    "next_sentence_pairs": lambda ids, g: next_sentence_pairs(ids, SPECIAL, g),
    "span_corruption": lambda ids, g: span_corruption(ids, SPECIAL, g),
    "bart_noise": lambda ids, g: bart_noise(
        ids, SPECIAL, g, permute_sentences=True, sentence_end_ids=(ids[0, 5].item(),), deletion_prob=0.1
    ),
    "prefix_split": lambda ids, g: (prefix_split(ids, g),),
    "ul2_denoise": lambda ids, g: ul2_denoise(ids, SPECIAL, g),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_a_seed_fixes_the_output_and_only_the_generator_is_used(name):
    transform, ids = TRANSFORMS[name], text(16, 64)
    global_state = torch.get_rng_state()
    first, again, other = transform(ids, seeded(7)), transform(ids, seeded(7)), transform(ids, seeded(8))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, other))
    assert torch.equal(torch.get_rng_state(), global_state)  # the global RNG is untouched


@pytest.mark.parametrize("name", TRANSFORMS)
def test_no_generator_draws_from_the_global_rng(name):
    transform, ids = TRANSFORMS[name], text(16, 64)
    torch.manual_seed(3)
    first = transform(ids, None)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, transform(ids, None)))
