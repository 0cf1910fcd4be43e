"""The encoder-decoder transformer (T5 and BART flavours) as a specification: the decoder is causal,
source padding is invisible, the source is read, cached decoding equals a full re-run, parameter
counts follow the closed form, a copy task trains, and both configs build."""

from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lm_lightning.errors import UserError
from lm_lightning.generation import beam_search, generate
from lm_lightning.models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig, build_encoder_decoder

CONF = Path(__file__).resolve().parents[1] / "lm_lightning" / "conf" / "model"
V, PAD = 40, 0

FLAVOURS = {
    "t5": dict(family="t5", position="t5", norm="rmsnorm", norm_position="pre", activation="relu", bias=False),
    "bart": dict(family="bart", position="learned", norm="layernorm", norm_position="post", activation="gelu",
                 bias=True),
    "sinusoidal": dict(family="t5", position="sinusoidal", norm="layernorm", norm_position="pre",
                       activation="gelu", bias=False),
}


def tiny(flavour: str = "t5", **overrides) -> EncoderDecoder:
    """A seeded 2+2-layer model small enough to run in milliseconds; untied, as a tied random model
    mostly repeats its input token."""
    options = dict(vocab_size=V, block_size=24, n_layer=2, n_head=2, n_embd=16, relative_buckets=8,
                   relative_max_distance=16, tie_embeddings=False, **FLAVOURS[flavour])
    options.update(overrides)
    torch.manual_seed(0)
    model = EncoderDecoder(EncoderDecoderConfig(**options)).eval()
    with torch.no_grad():  # the init's tiny weights make every output nearly equal: spread them
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(5.0)
    return model


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    """Random non-padding ids."""
    return torch.randint(1, V, shape, generator=torch.Generator().manual_seed(seed))


# --- masking ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_decoder_output_at_t_ignores_targets_after_t(flavour):
    model = tiny(flavour)
    src, tgt = tokens(2, 7), tokens(2, 9, seed=2)
    t = 4
    changed = tgt.clone()
    changed[:, t + 1 :] = tokens(2, 9 - t - 1, seed=3)
    assert not torch.equal(changed, tgt)
    with torch.no_grad():
        before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, t + 1 :], before[:, t + 1 :], atol=1e-3)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_source_padding_changes_nothing(flavour):
    model = tiny(flavour)
    src, tgt = tokens(2, 6), tokens(2, 8, seed=2)
    padded = torch.cat([src, torch.full((2, 5), PAD)], dim=1)
    with torch.no_grad():
        logits, logits_padded = model(src, tgt), model(padded, tgt)
        memory, mask = model.encode(src)
        memory_padded, mask_padded = model.encode(padded)
    torch.testing.assert_close(logits_padded, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(memory_padded[:, :6], memory, atol=1e-5, rtol=0)
    assert mask_padded.shape == (2, 1, 1, 11) and mask_padded[..., 6:].sum() == 0 and mask_padded[..., :6].all()


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_rows_padded_differently_match_their_unpadded_selves(flavour):
    model = tiny(flavour)
    long, short = tokens(1, 7), tokens(1, 4, seed=4)
    batch = torch.cat([long, torch.cat([short, torch.full((1, 3), PAD)], dim=1)])
    tgt = tokens(2, 5, seed=2)
    with torch.no_grad():
        together = model(batch, tgt)
        alone = torch.cat([model(long, tgt[:1]), model(short, tgt[1:])])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_decoder_reads_the_source(flavour):
    model = tiny(flavour)
    src, tgt = tokens(1, 6), tokens(1, 5, seed=2)
    changed = src.clone()
    changed[0, 2] = (src[0, 2] % (V - 1)) + 1  # another non-padding id
    with torch.no_grad():
        difference = (model(src, tgt) - model(changed, tgt)).abs()
    assert difference.amax(-1).min() > 1e-4  # every target position sees the source, the first one included


# --- generation ------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cached_generation_equals_full_rerun(flavour):
    model = tiny(flavour)
    src = torch.cat([tokens(2, 6), torch.tensor([[PAD] * 2, [5, 6]])], dim=1)  # row 0 padded
    view, start = model.generation_view(src)
    assert start.tolist() == [[model.config.decoder_start_id]] * 2
    cached = generate(view, start, 15, temperature=0, use_cache=True)
    uncached = generate(view, start, 15, temperature=0, use_cache=False)
    assert cached.shape == (2, 16)
    assert torch.equal(cached, uncached)
    assert cached[:, 1:].unique().numel() > 1  # the greedy output is not one repeated token
    sampled = [generate(view, start, 15, temperature=1.0, use_cache=use, generator=torch.Generator().manual_seed(7))
               for use in (True, False)]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_cached_decode_logits_equal_teacher_forcing(flavour):
    model = tiny(flavour)
    src, tgt = tokens(2, 6), tokens(2, 7, seed=2)
    with torch.no_grad():
        full = model(src, tgt)
        memory, mask = model.encode(src)
        caches = model.new_caches(2, memory, src.size(1))
        steps = [model.decode(tgt[:, :3], memory, mask, caches)]  # a block, then one token at a time
        steps += [model.decode(tgt[:, t : t + 1], memory, mask, caches) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert caches[0].length == 7 and caches[model.config.n_decoder_layer].length == 6


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_beam_search_from_one_prompt(flavour):
    model = tiny(flavour)
    view, start = model.generation_view(tokens(1, 6))
    greedy = generate(view, start, 8, temperature=0)
    assert torch.equal(beam_search(view, start, 8, beam_width=1), greedy)
    for use_cache in (True, False):
        beams = beam_search(view, start, 8, beam_width=3, use_cache=use_cache)
        assert beams.shape == (1, 9) and beams[0, 0] == model.config.decoder_start_id
    assert torch.equal(beam_search(view, start, 8, beam_width=3, use_cache=True),
                       beam_search(view, start, 8, beam_width=3, use_cache=False))


def test_view_rejects_a_batch_that_does_not_match_the_prompts():
    view, start = tiny().generation_view(tokens(2, 5))
    with pytest.raises(ValueError, match="2 prompts"):
        view(tokens(3, 1))


# --- parameters and FLOPs ----------------------------------------------------------------------


def test_t5_parameter_count_closed_form():
    L_enc, L_dec, d, H, ratio, buckets, V_ = 2, 3, 32, 4, 2.0, 8, 50
    model = build_encoder_decoder(vocab_size=V_, block_size=16, n_layer=L_enc, n_decoder_layer=L_dec, n_head=H,
                                  n_embd=d, mlp_ratio=ratio, relative_buckets=buckets, **FLAVOURS["t5"])
    d_ff = int(ratio * d)
    encoder_block = 4 * d * d + 2 * d * d_ff + 2 * d  # attention, relu MLP, two RMSNorm gains
    decoder_block = encoder_block + 4 * d * d + d  # + cross-attention (q, kv, proj) and its norm
    count = model.parameter_count()
    assert count.non_embedding == L_enc * encoder_block + L_dec * decoder_block + 2 * d  # + a final norm per stack
    assert count.embedding == V_ * d + 2 * buckets * H  # tied token table, a bias table per stack
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert count.total == sum(unique.values()) == count.embedding + count.non_embedding
    everything = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert everything == count.total + V_ * d  # the tied head is listed twice, counted once


def test_untied_bart_counts_head_and_both_position_tables_as_embedding():
    d, T, V_ = 16, 24, V
    model = tiny("bart")
    assert model.parameter_count().embedding == 2 * V_ * d + 2 * T * d


def test_flops_per_token_closed_form():
    model = tiny("t5")
    c, N = model.config, model.parameter_count().non_embedding
    attention_layers = c.n_layer + 2 * c.n_decoder_layer  # encoder self, decoder self and cross
    assert model.flops_per_token(10) == 6 * (N + c.n_embd * V) + 12 * attention_layers * c.n_embd * 10
    assert model.flops_per_token() == model.flops_per_token(c.block_size)


def test_describe_and_protocol():
    model = tiny("bart", n_decoder_layer=1)
    info = model.describe()
    assert info["architecture"] == "bart" and info["n_decoder_layer"] == 1 and info["total"] > 0
    assert model.causal is False and model.context_length == 24
    assert len(model.decoder) == 1 and len(model.encoder) == 2


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["t5", "bart"])
def test_copy_task_loss_halves_in_100_steps(flavour):
    # short sources: T5's positions are only relative and its cross-attention has none, so it finds
    # "source token t" from the sequence edges, which takes longer to learn the longer the copy
    torch.manual_seed(0)
    model = build_encoder_decoder(vocab_size=12, block_size=8, n_layer=2, n_head=4, n_embd=32,
                                  relative_buckets=8, relative_max_distance=8, **FLAVOURS[flavour]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    start = model.config.decoder_start_id

    def loss_of(src: torch.Tensor) -> torch.Tensor:
        tgt_in = torch.cat([torch.full((src.size(0), 1), start), src[:, :-1]], dim=1)  # target = source
        return F.cross_entropy(model(src, tgt_in).flatten(0, 1), src.flatten())

    held_out = torch.randint(1, 12, (64, 3), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        before = loss_of(held_out).item()
    for _ in range(100):
        loss = loss_of(torch.randint(1, 12, (32, 3), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = loss_of(held_out).item()
    assert after < before / 2, (before, after)


# --- configs and validation ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_config_instantiates_and_runs(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    cfg.vocab_size = 64
    model = hydra.utils.instantiate(cfg)
    assert isinstance(model, EncoderDecoder) and model.config.family == name
    assert model.config.n_decoder_layer == model.config.n_layer
    with torch.no_grad():
        logits = model(torch.randint(1, 64, (2, 10)), torch.randint(1, 64, (2, 7)))
    assert logits.shape == (2, 7, 64) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "field, value",
    [("position", "rope"), ("family", "gpt"), ("norm", "batchnorm"), ("norm_position", "middle"),
     ("activation", "tanh"), ("n_decoder_layer", 0), ("n_layer", 0), ("n_head", 3), ("pad_id", V),
     ("decoder_start_id", -1), ("dropout", 1.0), ("relative_buckets", 0)],
)
def test_bad_option_names_itself(field, value):
    options = dict(vocab_size=V, n_head=2, n_embd=16)
    options[field] = value
    with pytest.raises(UserError, match=f"model.{field}"):
        build_encoder_decoder(**options)


def test_decoder_start_defaults_to_pad():
    assert EncoderDecoderConfig(vocab_size=V, pad_id=3).decoder_start_id == 3


def test_sequences_beyond_the_context_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the context"):
        model.encode(tokens(1, 25))
