"""Decoding as a specification: greedy equals an argmax rollout written out by hand, the KV
cache changes nothing but speed, the sliding window past the context, top-k/top-p filtering
on hand-computed probabilities, seeded sampling, end-of-sequence handling and the text API."""

import pytest
import torch
from torch import nn

from lm_lightning.generation.sampling import filter_logits, generate, generate_text
from lm_lightning.models.gpt import GPT, GPTConfig

VOCAB, BLOCK = 40, 16




def tiny(position: str = "learned", init_std: float = 0.3) -> GPT:
    """A seeded random model; a larger init than 0.02 gives peaked, varied next-token choices."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16, position=position, init_std=init_std
    )
    return GPT(config).eval()


def greedy_by_hand(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Argmax rollout without a cache, re-running at most the last block_size tokens each step."""
    with torch.no_grad():
        for _ in range(steps):
            logits = model(idx[:, -model.config.block_size :])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


PROMPT = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 0, 11]])


class Forced(nn.Module):
    """Wraps a model so that row ``r`` of the batch gets ``bonus[r]`` added to the ``token`` logit."""

    def __init__(self, model: GPT, token: int, bonus: list[float]) -> None:
        super().__init__()
        self.model, self.config, self.token, self.bonus = model, model.config, token, bonus

    def new_caches(self, batch, like):
        return self.model.new_caches(batch, like)

    def forward(self, idx, caches=None):
        logits = self.model(idx, caches).clone()
        logits[..., self.token] += torch.tensor(self.bonus)[:, None]
        return logits


# --- greedy and the cache ---------------------------------------------------------------------


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_temperature_zero_is_the_argmax_rollout(position):
    model = tiny(position)
    expected = greedy_by_hand(model, PROMPT, 8)
    for use_cache in (True, False):
        out = generate(model, PROMPT, 8, temperature=0.0, use_cache=use_cache)
        assert torch.equal(out, expected)
    assert len(set(expected[0, 5:].tolist())) > 1  # a non-degenerate rollout, so the check has teeth


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi"])
def test_generation_past_block_size_slides_the_window(position):
    model = tiny(position)
    steps = 2 * BLOCK  # 5 + 32 tokens, more than twice the context
    expected = greedy_by_hand(model, PROMPT, steps)
    cached = generate(model, PROMPT, steps, temperature=0.0, use_cache=True)
    uncached = generate(model, PROMPT, steps, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 5 + steps)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)


def test_prompt_longer_than_block_size_is_cut_to_the_last_block():
    model = tiny()
    prompt = torch.randint(0, VOCAB, (1, BLOCK + 7), generator=torch.Generator().manual_seed(4))
    out = generate(model, prompt, 4, temperature=0.0)
    assert torch.equal(out, greedy_by_hand(model, prompt, 4))
    assert torch.equal(out[:, : BLOCK + 7], prompt)


def test_top_k_1_is_greedy_whatever_the_temperature():
    model = tiny()
    greedy = generate(model, PROMPT, 10, temperature=0.0)
    sampled = generate(model, PROMPT, 10, temperature=5.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)


def test_generate_restores_training_mode():
    model = tiny().train()
    generate(model, PROMPT, 2, temperature=0.0)
    assert model.training


# --- filtering --------------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(5))
    for k in (1, 5, 17):
        filtered = filter_logits(logits, top_k=k)
        kept = torch.isfinite(filtered)
        assert kept.sum(-1).tolist() == [k, k, k]
        expected = torch.zeros_like(kept).scatter(-1, logits.topk(k, dim=-1).indices, True)
        assert torch.equal(kept, expected)
        assert torch.equal(filtered[kept], logits[kept])  # survivors are untouched
    assert torch.equal(filter_logits(logits, top_k=VOCAB), logits)
    assert torch.equal(filter_logits(logits), logits)


@pytest.mark.parametrize("top_p,kept", [(0.3, 1), (0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (0.96, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    filtered = filter_logits(probs.log()[None], top_p=top_p)
    assert torch.isfinite(filtered).sum().item() == kept
    assert torch.isfinite(filtered[0, :kept]).all()  # the most probable tokens are the ones kept


def test_top_p_maps_the_kept_set_back_to_vocabulary_order():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3], [0.05, 0.15, 0.3, 0.5]])
    filtered = filter_logits(probs.log(), top_p=0.7)
    assert torch.isfinite(filtered).tolist() == [[False, True, False, True], [False, False, True, True]]
    assert torch.equal(filter_logits(probs.log(), top_p=1.0), probs.log())


# --- sampling ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    model = tiny(init_std=0.02)  # near-uniform next-token distribution: seeds must matter
    def sample(seed):
        return generate(model, PROMPT, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))
    assert not torch.equal(sample(7), generate(model, PROMPT, 12, temperature=0.0))


def test_sampled_tokens_come_from_the_filtered_set():
    model = tiny(init_std=0.02)
    out = generate(model, PROMPT[:1], 1, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    allowed = model(PROMPT[:1])[0, -1].topk(3).indices.tolist()
    assert out[0, -1].item() in allowed


# --- end of sequence --------------------------------------------------------------------------


def test_eos_stops_generation_when_every_sequence_has_produced_it():
    eos = 4
    model = Forced(tiny(), eos, bonus=[1e4, 1e4])
    out = generate(model, PROMPT, 10, temperature=1.0, eos_id=eos, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6)
    assert out[:, -1].tolist() == [eos, eos]


def test_finished_sequence_is_padded_with_eos_while_others_continue():
    eos = 4
    model = Forced(tiny(), eos, bonus=[1e4, float("-inf")])  # row 0 ends at once, row 1 never does
    out = generate(model, PROMPT, 6, temperature=1.0, eos_id=eos, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 5 + 6)
    assert out[0, 5:].tolist() == [eos] * 6
    assert eos not in out[1, 5:].tolist()


# --- text API ---------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character of ALPHABET; ids 0 and 1 are eos and bos."""

    alphabet = "^$abcdefghijklmnopqrstuvwxyz .,;:!?'-ABCDE"[:VOCAB]
    eos_id, bos_id = 0, 1

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids)


def test_generate_text_returns_only_the_continuation():
    model, tokenizer = tiny(), CharTokenizer()
    prompt = tokenizer.encode("the cat")
    ids = greedy_by_hand(model, torch.tensor([prompt]), 9)[0, len(prompt) :].tolist()
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    text = generate_text(model, tokenizer, "the cat", max_new_tokens=9, temperature=0.0)
    assert len(ids) > 0
    assert text == tokenizer.decode(ids)


def test_generate_text_from_an_empty_prompt_starts_at_bos():
    model, tokenizer = tiny(), CharTokenizer()
    ids = greedy_by_hand(model, torch.tensor([[tokenizer.bos_id]]), 6)[0, 1:].tolist()
    if tokenizer.eos_id in ids:
        ids = ids[: ids.index(tokenizer.eos_id)]
    assert generate_text(model, tokenizer, "", max_new_tokens=6, temperature=0.0) == tokenizer.decode(ids)


def test_generate_text_cuts_at_eos():
    tokenizer = CharTokenizer()
    model = Forced(tiny(), tokenizer.eos_id, bonus=[1e4])
    assert generate_text(model, tokenizer, "abc", max_new_tokens=5, temperature=0.0) == ""


# --- beam search ---------------------------------------------------------------------------------

from lm_lightning.generation.sampling import beam_search  # noqa: E402


def _sequence_logprob(model, prompt: torch.Tensor, new: list[int]) -> float:
    full = torch.cat([prompt, torch.tensor([new])], dim=1)
    logp = model(full[:, :-1]).log_softmax(-1)[0, prompt.size(1) - 1 :]
    return logp.gather(-1, torch.tensor(new)[:, None]).sum().item()


def _beam_model(vocab: int = 5):
    torch.manual_seed(11)
    return GPT(GPTConfig(vocab_size=vocab, block_size=16, n_layer=1, n_head=2, n_embd=16, init_std=0.5)).eval()


def test_beam_search_with_every_sequence_as_a_beam_finds_the_exact_best_sequence():
    import itertools

    model, prompt = _beam_model(), torch.tensor([[1, 2]])
    best = max(itertools.product(range(5), repeat=3), key=lambda seq: _sequence_logprob(model, prompt, list(seq)))
    found = beam_search(model, prompt, max_new_tokens=3, beam_width=25, length_penalty=0.0)
    assert found[0, 2:].tolist() == list(best)


def test_beam_width_one_is_greedy_and_wider_beams_never_score_lower():
    model, prompt = _beam_model(), torch.tensor([[3]])
    greedy = generate(model, prompt, 6, temperature=0)
    assert torch.equal(beam_search(model, prompt, 6, beam_width=1, length_penalty=0.0), greedy)
    wide = beam_search(model, prompt, 6, beam_width=4, length_penalty=0.0)
    assert _sequence_logprob(model, prompt, wide[0, 1:].tolist()) >= _sequence_logprob(model, prompt, greedy[0, 1:].tolist()) - 1e-6


def test_returned_beams_are_sorted_and_scored_by_their_log_probability():
    model, prompt = _beam_model(), torch.tensor([[3]])
    beams = beam_search(model, prompt, 5, beam_width=4, length_penalty=0.0, return_all=True)
    scores = [score for score, _ in beams]
    assert len(beams) >= 4 and scores == sorted(scores, reverse=True)
    for score, seq in beams:
        assert score == pytest.approx(_sequence_logprob(model, prompt, seq[0, 1:].tolist()), abs=1e-4)
    assert torch.equal(beams[0][1], beam_search(model, prompt, 5, beam_width=4, length_penalty=0.0))


def test_beam_search_with_and_without_cache_agree_and_stop_at_eos():
    model, prompt = _beam_model(), torch.tensor([[0, 4]])
    assert torch.equal(beam_search(model, prompt, 8, beam_width=3, use_cache=True),
                       beam_search(model, prompt, 8, beam_width=3, use_cache=False))
    out = beam_search(model, prompt, 8, beam_width=3, eos_id=2)
    new = out[0, 2:].tolist()
    assert 2 not in new[:-1]  # a hypothesis ends at its first eos


def test_generate_text_cuts_at_the_first_stop_string_and_runs_beam_search():
    model, tokenizer = tiny(), CharTokenizer()
    full = generate_text(model, tokenizer, "the cat", max_new_tokens=12, temperature=0.0, eos_id=-1)
    assert len(full) == 12
    stop = full[4:6]
    cut = generate_text(model, tokenizer, "the cat", max_new_tokens=12, temperature=0.0, eos_id=-1, stop=[stop, "\x00"])
    assert cut == full[: full.index(stop)]
    beam = generate_text(model, tokenizer, "the cat", max_new_tokens=12, beam_width=3, eos_id=-1)
    prompt = torch.tensor([tokenizer.encode("the cat")])
    assert beam == tokenizer.decode(beam_search(model, prompt, 12, beam_width=3, eos_id=-1)[0, prompt.size(1):].tolist())


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_model_with_non_finite_logits_is_named_not_sampled(temperature):
    """A diverged model (NaN weights) is refused in one UserError, not torch.multinomial's error (or, greedy, a sample
    of argmax over NaNs); the run's end-of-run sample then records none (training/run.py)."""
    from lm_lightning.errors import UserError
    from lm_lightning.generation.sampling import NonFiniteLogits

    model = tiny()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLogits, match="not finite") as err:
        generate(model, PROMPT, max_new_tokens=3, temperature=temperature, generator=torch.Generator().manual_seed(0))
    assert isinstance(err.value, UserError)
