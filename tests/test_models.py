"""The GPT model as a specification: parameter and FLOP accounting by hand formula, every
architecture option composing, causality, the KV cache matching a full forward, GPT-2
initialisation, weight tying and config validation."""

import itertools
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lm_lightning.models.gpt import POSITIONS, GPT, GPTConfig
from lm_lightning.models.layers import Rotary
from lm_lightning.config.app import CONF_DIR





def tiny(**overrides) -> GPT:
    """A seeded 2-layer model small enough to run in milliseconds."""
    options = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False)
    options.update(overrides)
    torch.manual_seed(0)
    return GPT(GPTConfig(**options)).eval()


# --- parameter counts -----------------------------------------------------------------------


@pytest.mark.parametrize("L, d", [(2, 64), (6, 384), (12, 768)])
def test_standard_shape_non_embedding_is_12_L_d2_plus_norm_gains(L, d):
    V, T = 97, 32
    model = tiny(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=d)  # bias=False, tied, learned
    count = model.parameter_count()
    # per block: c_attn 3d² + attn c_proj d² + c_fc 4d² + mlp c_proj 4d² = 12d²;
    # gains without bias: ln_1 and ln_2 per block, ln_f once
    norms = (2 * L + 1) * d
    assert count.non_embedding == 12 * L * d * d + norms
    assert count.non_embedding == pytest.approx(12 * L * d * d, rel=0.01)
    assert count.embedding == V * d + T * d
    assert count.total == count.embedding + count.non_embedding


def test_total_counts_each_unique_parameter_once():
    model = tiny(bias=True)
    every = list(model.named_parameters(remove_duplicate=False))
    unique = {p.data_ptr(): p for _, p in every}
    V, d = 50, 16
    assert model.parameter_count().total == sum(p.numel() for p in unique.values())
    # the tied head is listed twice by module but counted once
    assert sum(p.numel() for _, p in every) == model.parameter_count().total + V * d


def test_bias_adds_eleven_d_per_layer_plus_final_norm():
    L, d = 2, 16
    without, with_bias = tiny(bias=False), tiny(bias=True)
    # per block: c_attn 3d, attn c_proj d, c_fc 4d, mlp c_proj d, ln_1 d, ln_2 d; ln_f d
    assert with_bias.parameter_count().total - without.parameter_count().total == 11 * L * d + d


def test_the_nanogpt_experiment_keeps_every_listed_setting_and_0_80M():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=shakespeare_char", "paths.output_dir=/tmp/out"])
    m, data, opt, sched, trainer = cfg.model, cfg.data, cfg.optimizer, cfg.scheduler, cfg.trainer
    # BASELINES.md's nanoGPT command: 4 layers, 4 heads, width 128, context 64, no biases, tied, no dropout
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.bias, m.tie_embeddings, m.dropout) == (
        4, 4, 128, 64, False, True, 0.0)
    assert (data.batch_size, trainer.max_steps, trainer.gradient_clip_val, trainer.accumulate_grad_batches) == (
        12, 2000, 1.0, 1)
    assert (opt.lr, list(opt.betas), opt.weight_decay, sched.warmup_steps, sched.min_lr_ratio) == (
        1e-3, [0.9, 0.99], 0.1, 100, 0.1)
    assert (cfg.tokenizer.type, data.corpus.split.mode, data.corpus.split.val_fraction) == ("char", "contiguous", 0.1)
    # nanoGPT prints its parameters without the position table: "number of parameters: 0.80M" for 65 characters
    for position in ("rope", "learned"):  # the experiment's positions, and nanoGPT's own
        model = instantiate(m, position=position, vocab_size=65)
        table = 64 * 128 if position == "learned" else 0
        assert model.parameter_count().total - table == 795_904
    assert m.position == "rope"


def test_untied_head_adds_V_times_d():
    V, d = 50, 16
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert untied.parameter_count().total - tied.parameter_count().total == V * d


@pytest.mark.parametrize("position", [p for p in POSITIONS if p not in ("learned", "t5")])
def test_only_learned_positions_count_as_embedding_parameters(position):
    V, d = 50, 16
    model = tiny(position=position)
    assert model.parameter_count().embedding == V * d
    assert model.parameter_count().total == tiny(position="learned").parameter_count().total - 16 * d


def test_swiglu_keeps_the_mlp_at_8_d2():
    d = 48  # 2/3 · 4d = 128 exactly
    gelu = tiny(n_embd=d, n_head=4, activation="gelu")
    swiglu = tiny(n_embd=d, n_head=4, activation="swiglu")
    assert swiglu.h[0].mlp.c_gate.weight.shape == (128, d)
    assert swiglu.parameter_count().total == gelu.parameter_count().total


def test_flops_per_token_by_hand():
    V, T, L, d = 97, 32, 2, 64
    model = tiny(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=d)
    N = 12 * L * d * d + (2 * L + 1) * d
    assert model.flops_per_token() == 6 * (N + d * V) + 12 * L * d * T
    assert model.flops_per_token(context=8) == 6 * (N + d * V) + 12 * L * d * 8


def test_untying_the_head_does_not_change_the_compute():
    # tied and untied models run exactly the same matmuls; only the parameter storage differs
    assert tiny(tie_embeddings=False).flops_per_token() == tiny(tie_embeddings=True).flops_per_token()


# --- every option composes -----------------------------------------------------------------


@pytest.mark.parametrize(
    "position,norm,norm_position,activation,bias",
    list(
        itertools.product(POSITIONS, ("layernorm", "rmsnorm"), ("pre", "post"), ("gelu", "relu", "swiglu"), (False, True))
    ),
)
def test_every_option_composes_and_runs(position, norm, norm_position, activation, bias):
    model = tiny(position=position, norm=norm, norm_position=norm_position, activation=activation, bias=bias)
    idx = torch.randint(0, 50, (3, 11))
    logits = model(idx)
    assert logits.shape == (3, 11, 50)
    assert torch.isfinite(logits).all()


def test_forward_beyond_block_size_raises():
    model = tiny()
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


# --- causality and positions ------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("position", POSITIONS)
def test_changing_token_t_leaves_earlier_logits_unchanged(position, norm_position):
    model = tiny(position=position, norm_position=norm_position)
    idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(idx)
    for t in (0, 5, 11):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        after = model(changed)
        torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(after[:, t], before[:, t], atol=1e-6)


@pytest.mark.parametrize("position", POSITIONS)
def test_only_positions_make_the_model_order_sensitive(position):
    # the last position attends to the same set of tokens in both orders: with causal attention and
    # no positional signal the model sees a set, so only a position option can tell the orders apart
    model = tiny(position=position, n_layer=1, init_std=0.5)  # one layer: earlier positions cannot leak order
    forward = torch.tensor([[3, 9, 14, 27, 5]])
    swapped = torch.tensor([[27, 14, 9, 3, 5]])
    same = torch.allclose(model(forward)[0, -1], model(swapped)[0, -1], atol=1e-4)
    assert same == (position == "none")


def test_rotary_scores_depend_only_on_relative_position():
    rotary = Rotary(head_dim=8, max_len=64)
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)

    def score(query_position, key_position):
        return (rotary(q, query_position) * rotary(k, key_position)).sum().item()

    for offset in (0, 3, 17):
        assert score(offset, 0) == pytest.approx(score(40 + offset, 40), abs=1e-5)
    assert score(5, 0) != pytest.approx(score(9, 0), abs=1e-3)
    torch.testing.assert_close(rotary(q, 23).norm(), q.norm())  # a rotation keeps lengths
    torch.testing.assert_close(rotary(q, 0), q)  # position 0 is the identity


# --- KV cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_position", ["pre", "post"])
@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_one_token_at_a_time_matches_full_forward(position, norm_position):
    model = tiny(position=position, norm_position=norm_position)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))  # up to the full context
    full = model(idx)
    caches = model.new_caches(2, full)
    steps = [model(idx[:, :5], caches)]  # prefill a prefix
    for t in range(5, 16):
        steps.append(model(idx[:, t : t + 1], caches))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert caches[0].length == 16


@pytest.mark.parametrize("position", POSITIONS)
def test_kv_cache_chunk_after_prefix_matches_full_forward(position):
    model = tiny(position=position)
    idx = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(3))
    full = model(idx)
    caches = model.new_caches(2, full)
    prefix = model(idx[:, :4], caches)
    chunk = model(idx[:, 4:9], caches)  # several new queries attend to the cache and causally to each other
    last = model(idx[:, 9:], caches)
    torch.testing.assert_close(torch.cat([prefix, chunk, last], dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_past_the_context_raises():
    model = tiny()
    caches = model.new_caches(1, model(torch.zeros(1, 1, dtype=torch.long)))
    model(torch.zeros(1, 16, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="exceeds the context"):
        model(torch.zeros(1, 1, dtype=torch.long), caches)


# --- initialisation and tying ----------------------------------------------------------------


def test_residual_projections_are_scaled_by_one_over_sqrt_2L():
    L, d = 3, 256
    model = tiny(n_layer=L, n_embd=d, n_head=4, init_std=0.02)
    projections = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_proj.weight")])
    others = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("c_fc.weight")])
    assert projections.numel() == L * (d * d + 4 * d * d)
    assert projections.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.02)
    assert projections.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert others.std().item() == pytest.approx(0.02, rel=0.02)


def test_tied_head_and_embedding_are_one_tensor():
    model = tiny(tie_embeddings=True)
    assert model.lm_head.weight is model.wte.weight
    with torch.no_grad():
        model.wte.weight[3, 0] = 123.0
    assert model.lm_head.weight[3, 0].item() == 123.0
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()


# --- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,names",
    [
        (dict(n_embd=10, n_head=3), "n_head"),
        (dict(position="bucketed"), "position"),
        (dict(position="rope", n_embd=18, n_head=2), "rope"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(norm="batchnorm"), "norm"),
        (dict(norm_position="middle"), "norm_position"),
        (dict(activation="tanh"), "activation"),
    ],
)
def test_bad_config_raises_value_error_naming_the_option(overrides, names):
    with pytest.raises(ValueError, match=names):
        tiny(**overrides)


def test_alibi_slopes_and_bias_follow_the_paper():
    from lm_lightning.models.layers import alibi_bias, alibi_slopes

    # 8 heads: 1/2, 1/4, ..., 1/256 (Press et al. 2022, section 3)
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4-head series (1/4, 1/16, 1/64, 1/256) then every other one of the 8-head series (1/2, 1/8)
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))
    bias = alibi_bias(torch.tensor([0.5]), query_start=2, n_query=2, n_key=4, causal=True)
    expected = torch.tensor([[[-1.0, -0.5, 0.0, float("-inf")], [-1.5, -1.0, -0.5, 0.0]]])
    torch.testing.assert_close(bias, expected)



def test_t5_relative_bias_buckets_and_parameters():
    from lm_lightning.models.layers import relative_position_bucket

    distance = torch.arange(-200, 1)  # key - query for a causal model: keys at or before the query
    buckets = relative_position_bucket(distance, bidirectional=False, num_buckets=32, max_distance=128)
    assert buckets[-1] == 0 and buckets[-16] == 15  # distances 0..15 have a bucket each
    assert buckets[-17] == 16 and buckets[0] == 31  # then logarithmic, 128 and beyond share the last
    assert bool((buckets[:-1] >= buckets[1:]).all())  # farther never maps to a nearer bucket
    both = relative_position_bucket(torch.tensor([-3, 3]), bidirectional=True, num_buckets=32, max_distance=128)
    assert both.tolist() == [3, 16 + 3]  # keys after the query use the second half
    model = tiny(position="t5")
    assert model.parameter_count().embedding == 50 * 16 + 32 * model.config.n_head  # one learned scalar per bucket and head
