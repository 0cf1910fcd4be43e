"""The architecture/objective zoo: masks, Mixture-of-Experts, every objective on every family it
fits, the compatibility check, and generation from every generative family."""

from __future__ import annotations

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from lm_lightning.models.capabilities import VALID_OBJECTIVES, check_compatible, valid_pairs
from lm_lightning.errors import IncompatiblePair
from lm_lightning.generation import decoding_view, generate, generate_text, is_generative
from lm_lightning.models.encoder import Encoder, EncoderConfig
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.models.layers import MoEFeedForward
from lm_lightning.objectives.special_tokens import SpecialTokens

CONF = __import__("pathlib").Path(__file__).resolve().parents[1] / "lm_lightning" / "conf"
V = 40  # tokenizer vocabulary of the synthetic batches

MODEL_OF_FAMILY = {"gpt": "gpt", "prefix_lm": "prefix_lm", "bert": "bert", "t5": "t5", "bart": "bart", "rnn": "rnn",
                   "lstm": "lstm", "gru": "gru", "ffn": "ffn", "bidirectional rnn": "birnn",
                   "bidirectional lstm": "bilstm", "bidirectional gru": "bigru"}
SMALL = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 34, "window": 4, "hidden": 64}


def model_config(name: str) -> dict:
    """conf/model/<name>.yaml with its defaults applied, made tiny."""
    cfg = OmegaConf.load(CONF / "model" / f"{name}.yaml")
    if "defaults" in cfg:
        base = model_config(cfg.defaults[0])
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    cfg = OmegaConf.to_container(cfg)
    return {**cfg, **{k: v for k, v in SMALL.items() if k in cfg}}


def objective(name: str):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "objective" / f"{name}.yaml"))
    return hydra.utils.instantiate({**cfg, "vocab_size": V})


def build(name: str, vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return hydra.utils.instantiate({**model_config(name), "vocab_size": vocab})


def text_batch(batch: int = 8, length: int = 35, seed: int = 0) -> torch.Tensor:
    """Windows (B, T + 1) of a learnable text: each row counts up through the text ids from a random start."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(4, V, (batch, 1), generator=g)
    return 4 + (start - 4 + torch.arange(length)) % (V - 4)


# --- masks ------------------------------------------------------------------------------------


def test_prefix_positions_see_the_whole_prefix_and_nothing_after_it():
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16, family="prefix_lm")).eval()
    idx = torch.randint(4, V, (1, 12))
    P = 5
    prefix = torch.tensor([P])
    base = model(idx, prefix_lengths=prefix)
    later_prefix_token = idx.clone()
    later_prefix_token[0, P - 1] = (idx[0, P - 1] + 1 - 4) % (V - 4) + 4
    changed = model(later_prefix_token, prefix_lengths=prefix)
    # position 0 sees the last prefix token (bidirectional prefix)...
    assert not torch.allclose(changed[0, 0], base[0, 0], atol=1e-6)
    after_prefix = idx.clone()
    after_prefix[0, P + 2] = (idx[0, P + 2] + 1 - 4) % (V - 4) + 4
    changed = model(after_prefix, prefix_lengths=prefix)
    # ...but no prefix position, nor any position before P + 2, sees a token after the prefix
    torch.testing.assert_close(changed[0, : P + 2], base[0, : P + 2], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[0, P + 2], base[0, P + 2], atol=1e-6)


def test_a_prefix_of_one_is_plain_causal_attention():
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16, family="prefix_lm")).eval()
    idx = torch.randint(4, V, (2, 10))
    torch.testing.assert_close(model(idx, prefix_lengths=torch.tensor([1, 1])), model(idx), atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_padding_never_changes_the_encoder_outputs_of_real_tokens(norm_position):
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=V, block_size=20, n_layer=2, n_head=2, n_embd=16,
                                  norm_position=norm_position)).eval()
    idx = torch.randint(4, V, (2, 9))
    padded = torch.cat([idx, torch.zeros(2, 6, dtype=torch.long)], dim=1)  # pad id 0
    torch.testing.assert_close(model(padded)[:, :9], model(idx), atol=1e-5, rtol=0)


def test_the_encoder_is_bidirectional():
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(vocab_size=V, block_size=20, n_layer=1, n_head=2, n_embd=16)).eval()
    idx = torch.randint(4, V, (1, 9))
    later = idx.clone()
    later[0, 8] = (idx[0, 8] + 1 - 4) % (V - 4) + 4
    assert not torch.allclose(model(later)[0, 0], model(idx)[0, 0], atol=1e-6)


# --- Mixture of Experts -----------------------------------------------------------------------


def test_moe_counts_total_and_active_parameters():
    dense = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False))
    moe = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16, bias=False, n_experts=4, moe_top_k=1))
    d, L = 16, 2
    expert = 8 * d * d  # c_fc 4d² + c_proj 4d²
    router = 4 * d
    assert moe.parameter_count().total == dense.parameter_count().total + L * (3 * expert + router)
    assert moe.parameter_count().active == dense.parameter_count().total + L * router  # one expert per token
    assert dense.parameter_count().active == dense.parameter_count().total
    assert moe.flops_per_token() == dense.flops_per_token() + 6 * L * router  # compute follows active parameters


def test_moe_mixes_the_top_k_experts_by_renormalised_router_probabilities():
    torch.manual_seed(0)
    layer = MoEFeedForward(8, 16, "gelu", bias=False, dropout=0.0, n_experts=4, top_k=2)
    x = torch.randn(3, 8)
    probs = layer.router(x).softmax(-1)
    expected = torch.zeros_like(x)
    for i in range(3):
        weights, chosen = probs[i].topk(2)
        for w, e in zip(weights / weights.sum(), chosen.tolist()):
            expected[i] += w * layer.experts[e](x[i : i + 1])[0]
    torch.testing.assert_close(layer(x[None])[0], expected, atol=1e-6, rtol=0)


def test_moe_load_balancing_loss_is_one_when_uniform_and_grows_with_imbalance():
    layer = MoEFeedForward(8, 16, "gelu", bias=False, dropout=0.0, n_experts=4, top_k=1)
    torch.nn.init.zeros_(layer.router.weight)  # every expert equally likely
    layer(torch.randn(1, 64, 8))
    assert float(layer.aux_loss.detach()) == pytest.approx(1.0)
    with torch.no_grad():  # every token strongly prefers expert 0
        layer.router.weight[0] = 0.0
        layer.router.weight[0, 0] = 100.0
    layer(torch.rand(1, 64, 8) + 0.5)
    assert float(layer.aux_loss.detach()) > 3.5  # → n_experts when all tokens go to one expert


# --- objectives on the families they fit --------------------------------------------------------


@pytest.mark.parametrize("family, objective_name", valid_pairs())
def test_every_valid_pair_learns(family, objective_name):
    """30 AdamW steps on a learnable synthetic text lower each pair's loss by at least a fifth."""
    torch.manual_seed(0)
    obj = objective(objective_name)
    model = build(MODEL_OF_FAMILY[family], obj.model_vocab_size(V))
    lr = 1e-2 if family.split()[-1] in ("rnn", "lstm", "gru") else 3e-3  # recurrent cells learn slower at first
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    batch = text_batch()
    losses = []
    for step in range(30):
        out = obj(model, batch, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
        assert out.n_tokens > 0
        assert set(out.accuracies) == set(obj.accuracy_names)
    assert losses[-1] < 0.8 * losses[0], (family, objective_name, losses[0], losses[-1])


def test_masked_lm_scores_only_the_selected_tokens_and_reports_their_accuracy():
    obj = objective("mlm")
    batch = text_batch(16, 35)
    out = obj(build("bert", obj.model_vocab_size(V)), batch, torch.Generator().manual_seed(0))
    n = batch[:, :-1].numel()
    assert 0.10 * n < int(out.n_tokens) < 0.20 * n
    hits, total = out.accuracies["masked_accuracy"]
    assert int(total) == int(out.n_tokens) and 0 <= int(hits) <= int(total)


def test_prefix_lm_objective_scores_only_tokens_after_the_prefix():
    obj = objective("prefix_lm")
    batch = text_batch(64, 33)
    out = obj(build("prefix_lm", V), batch, torch.Generator().manual_seed(0))
    T = 32
    # prefix P uniform in [1, T-1]: positions P-1..T-1 are scored, T-P+1 of them, mean T/2 + 1
    assert int(out.n_tokens) / 64 == pytest.approx(T / 2 + 1, rel=0.15)


def test_the_model_vocabulary_grows_by_the_objectives_special_tokens():
    assert objective("causal_lm").model_vocab_size(V) == V
    assert objective("mlm").model_vocab_size(V) == SpecialTokens(V).total_vocab == V + 106
    assert objective("span_corruption").model_vocab_size(V) == V + 106


# --- compatibility ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name, objective_name, valid", [
    ("lstm", "mlm", "causal_lm"),
    ("bert", "span_corruption", "mlm, mlm_nsp"),
    ("gpt", "ul2", "causal_lm"),
    ("bilstm", "causal_lm", "mlm"),
    ("ffn", "bart_denoising", "causal_lm"),
])
def test_incompatible_pairs_are_refused_with_the_valid_objectives(model_name, objective_name, valid):
    obj_cfg = OmegaConf.load(CONF / "objective" / f"{objective_name}.yaml")
    with pytest.raises(IncompatiblePair, match=f"valid objectives for .* are {valid}$"):
        check_compatible(model_config(model_name), obj_cfg)


def test_every_model_config_names_a_known_family_and_every_family_has_a_config():
    families = set()
    for path in (CONF / "model").glob("*.yaml"):
        cfg = model_config(path.stem)
        family = f"bidirectional {cfg['family']}" if cfg.get("bidirectional") else cfg["family"]
        assert family in VALID_OBJECTIVES, path
        families.add(family)
    assert families == set(VALID_OBJECTIVES)


# --- generation -------------------------------------------------------------------------------------

GENERATIVE = ["gpt", "prefix_lm", "t5", "bart", "rnn", "lstm", "gru", "ffn"]


class Chars:
    """A minimal tokenizer over the synthetic ids: id i ↔ chr(ord('a') + i - 4)."""

    vocab_size, bos_id, eos_id = V, 2, 3

    def encode(self, text):
        return [ord(c) - ord("a") + 4 for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 4) if i >= 4 else "" for i in ids)


@pytest.mark.parametrize("name", GENERATIVE)
def test_every_generative_family_decodes_with_the_same_options_and_the_cache_changes_nothing(name):
    model = build(name, V + 106, seed=1).eval()
    assert is_generative(model)
    view, start = decoding_view(model, torch.tensor([[5, 6, 7, 8]]))
    for options in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 10, "top_p": 0.9}):
        cached = generate(view, start, 12, use_cache=True, generator=torch.Generator().manual_seed(3), **options)
        uncached = generate(view, start, 12, use_cache=False, generator=torch.Generator().manual_seed(3), **options)
        assert torch.equal(cached, uncached), (name, options)
        assert cached.shape == (1, start.size(1) + 12)
    text = generate_text(model, Chars(), "abcd", max_new_tokens=6, temperature=0.0)
    beam = generate_text(model, Chars(), "abcd", max_new_tokens=6, beam_width=2)
    assert isinstance(text, str) and isinstance(beam, str)


@pytest.mark.parametrize("name", ["bert", "bilstm"])
def test_bidirectional_models_refuse_to_generate(name):
    model = build(name, V + 106)
    assert not is_generative(model)
    with pytest.raises(ValueError, match="not generative"):
        generate_text(model, Chars(), "abcd", max_new_tokens=3)


@pytest.mark.parametrize("name", ["bert", "t5", "bart"])
def test_any_transformer_family_takes_a_mixture_of_experts(name):
    dense = build(name, V + 106)
    moe = hydra.utils.instantiate({**model_config(name), "vocab_size": V + 106, "n_experts": 3, "moe_top_k": 1})
    extra = moe.parameter_count().total - dense.parameter_count().total
    assert extra > 0 and moe.parameter_count().active < moe.parameter_count().total
    obj = objective({"bert": "mlm"}.get(name, "span_corruption"))
    obj(moe, text_batch(), torch.Generator().manual_seed(0))
    assert 1.0 <= float(moe.aux_loss().detach()) <= 3.0
