"""Recurrent (RNN, LSTM, GRU) and fixed-window feed-forward language models as a specification:
causality, the cache matching a full forward, generation and beam search through the cache,
parameter counts by closed form, learning a pattern, config validation and the yaml configs."""

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from lm_lightning.errors import UserError
from lm_lightning.generation.sampling import beam_search, generate
from lm_lightning.models.ffn import FFNConfig, FFNLM, build_ffn
from lm_lightning.models.recurrent import RecurrentLM, build_recurrent

from helpers import REPO

RECURRENT = ("rnn", "lstm", "gru")
FAMILIES = (*RECURRENT, "ffn")
V, T = 23, 12


def tiny(family: str, **overrides) -> torch.nn.Module:
    """A seeded small model of ``family`` in eval mode."""
    torch.manual_seed(0)
    options = dict(vocab_size=V, block_size=48, n_layer=2, n_embd=16)
    if family == "ffn":
        options.update(window=4, hidden=32)
        options.update(overrides)
        return build_ffn(**options).eval()
    options.update(overrides)
    return build_recurrent(family, **options).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- causality ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_unidirectional_logits_ignore_later_tokens(family):
    model = tiny(family)
    assert model.causal
    idx = tokens()
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % V
    a, b = model(idx), model(changed)
    assert a.shape == (2, T, V)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6], b[:, 6], atol=1e-4)  # the changed token itself matters


def test_ffn_sees_exactly_its_window():
    model = tiny("ffn", window=4)
    idx = tokens()
    changed = idx.clone()
    changed[:, 2] = (changed[:, 2] + 1) % V
    a, b = model(idx), model(changed)
    assert not torch.allclose(a[:, 2:6], b[:, 2:6], atol=1e-4)  # positions 2..5 see token 2 ...
    for t in (3, 4, 5):
        assert not torch.allclose(a[:, t], b[:, t], atol=1e-4)
    torch.testing.assert_close(a[:, 6:], b[:, 6:], atol=1e-6, rtol=0)  # ... position 6 no longer does


@pytest.mark.parametrize("family", RECURRENT)
def test_bidirectional_reads_later_tokens_and_cannot_generate(family):
    model = tiny(family, bidirectional=True)
    assert not model.causal
    idx = tokens()
    changed = idx.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    a, b = model(idx), model(changed)
    assert a.shape == (2, T, V)
    assert not torch.allclose(a[:, 0], b[:, 0], atol=1e-6)  # the first position sees the last token
    with pytest.raises(UserError, match="bidirectional.*cannot generate"):
        model.new_caches(1, next(model.parameters()))


# --- cache and generation -------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_token_by_token_through_the_cache_equals_one_forward(family):
    model = tiny(family)
    idx = tokens()
    full = model(idx)
    caches = model.new_caches(2, next(model.parameters()))
    # a prompt of 3 tokens at once, then one token at a time
    steps = [model(idx[:, :3], caches)] + [model(idx[:, t : t + 1], caches) for t in range(3, T)]
    assert caches[0].length == T
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_reorder_selects_batch_rows(family):
    model = tiny(family)
    idx = tokens(batch=3)
    caches = model.new_caches(3, next(model.parameters()))
    model(idx[:, :-1], caches)
    order = torch.tensor([2, 2, 0])
    for c in caches:
        c.reorder(order)
    last = model(idx[order, -1:], caches)[:, 0]
    torch.testing.assert_close(last, model(idx[order])[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_cache_matches_without(family):
    model = tiny(family)
    idx = tokens(batch=2, length=5)
    greedy = generate(model, idx, 20, temperature=0, use_cache=True)
    assert greedy.shape == (2, 25)
    assert torch.equal(greedy, generate(model, idx, 20, temperature=0, use_cache=False))
    sampled = [
        generate(model, idx, 20, temperature=1.0, use_cache=cache, generator=torch.Generator().manual_seed(7))
        for cache in (True, False)
    ]
    assert torch.equal(*sampled)
    beams = beam_search(model, idx[:1], 10, beam_width=3)
    assert beams.shape == (1, 15)
    assert torch.equal(beams[:, :5], idx[:1])
    assert torch.equal(beams, beam_search(model, idx[:1], 10, beam_width=3, use_cache=False))


# --- parameter and FLOP accounting ----------------------------------------------------------


@pytest.mark.parametrize("family, gates", [("rnn", 1), ("gru", 3), ("lstm", 4)])
def test_recurrent_non_embedding_count_is_the_closed_form(family, gates):
    L, d = 3, 16
    model = tiny(family, n_layer=L, n_embd=d)
    count = model.parameter_count()
    # per layer and gate: input weights d·d, recurrent weights d·d, and PyTorch's two bias vectors
    assert count.non_embedding == L * gates * (d * d + d * d + 2 * d)
    assert count.embedding == V * d  # tied head counted once
    unique = {p.data_ptr(): p for p in model.parameters()}
    assert count.total == sum(p.numel() for p in unique.values()) == count.embedding + count.non_embedding
    assert model.flops_per_token() == model.flops_per_token(1000) == 6 * (count.non_embedding + d * V)


def test_untied_head_is_embedding_and_bidirectional_adds_a_projection():
    d = 16
    tied, untied = tiny("lstm", n_embd=d), tiny("lstm", n_embd=d, tie_embeddings=False)
    assert untied.parameter_count().embedding == 2 * V * d
    assert untied.parameter_count().non_embedding == tied.parameter_count().non_embedding
    bi = tiny("gru", n_layer=2, n_embd=d, bidirectional=True)
    # two directions; layer 2 reads both (2d inputs); the projection 2d → d with bias
    per_direction = 3 * (d * d + d * d + 2 * d) + 3 * (2 * d * d + d * d + 2 * d)
    assert bi.parameter_count().non_embedding == 2 * per_direction + 2 * d * d + d


def test_ffn_counts_and_description():
    w, L, d, h = 4, 2, 16, 32
    model = tiny("ffn", window=w, n_layer=L, n_embd=d, hidden=h)
    count = model.parameter_count()
    # hidden layers (w·d → h, h → h), projection h → d, all with biases; the padding vector is embedding
    assert count.non_embedding == (w * d * h + h) + (h * h + h) + (h * d + d)
    assert count.embedding == V * d + d
    assert count.total == sum(p.numel() for p in model.parameters())
    assert model.flops_per_token() == 6 * (count.non_embedding + d * V)
    described = model.describe()
    assert described["architecture"] == "ffn" and described["window"] == w and described["total"] == count.total
    assert tiny("gru").describe()["architecture"] == "gru"
    assert model.context_length == 48


# --- learning -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_hundred_steps_halve_the_loss_on_a_repeating_pattern(family):
    model = tiny(family, n_embd=32).train()
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    batch = pattern.repeat(4, 5)[:, :33]  # (4, 33): 32 inputs and their next tokens
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    first = loss().item()
    for _ in range(100):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < first / 2


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, option",
    [
        (lambda: build_recurrent("transformer", vocab_size=V), "model.family"),
        (lambda: build_recurrent("lstm", vocab_size=V, n_layer=0), "model.n_layer"),
        (lambda: build_recurrent("gru", vocab_size=V, n_embd=-4), "model.n_embd"),
        (lambda: build_recurrent("rnn", vocab_size=V, block_size=0), "model.block_size"),
        (lambda: build_recurrent("rnn", vocab_size=V, dropout=1.0), "model.dropout"),
        (lambda: build_ffn("lstm", vocab_size=V), "model.family"),
        (lambda: build_ffn(vocab_size=V, window=0), "model.window"),
        (lambda: build_ffn(vocab_size=V, hidden=0), "model.hidden"),
        (lambda: build_ffn(vocab_size=V, activation="swish"), "model.activation"),
        (lambda: FFNLM(FFNConfig(vocab_size=0)), "model.vocab_size"),
    ],
)
def test_bad_config_names_the_option(build, option):
    with pytest.raises(UserError, match=option):
        build()


@pytest.mark.parametrize("name, cls", [(n, RecurrentLM) for n in RECURRENT] + [("ffn", FFNLM)])
def test_yaml_config_instantiates_and_runs(name, cls):
    cfg = OmegaConf.load(REPO / "lm_lightning" / "conf" / "model" / f"{name}.yaml")
    assert cfg.family == name
    model = hydra.utils.instantiate({**OmegaConf.to_container(cfg), "vocab_size": 70})
    assert isinstance(model, cls) and model.config.vocab_size == 70
    assert model(torch.randint(0, 70, (1, 10))).shape == (1, 10, 70)
