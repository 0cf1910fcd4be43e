"""Parameter-efficient fine-tuning: LoRA, bottleneck adapters, prompt tuning on a small GPT."""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
import torch.nn.functional as F

from lm_lightning.adaptation.peft import (
    LoRAEmbedding,
    LoRALinear,
    PromptTunedGPT,
    apply_adapters,
    apply_lora,
    count_trainable,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT, GPTConfig

ATTENTION_AND_MLP = ["c_attn", "c_proj", "c_fc"]  # "c_proj" is both attn.c_proj and mlp.c_proj


def tiny_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32), **overrides}))


def larger_gpt(n_embd: int = 256) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=1000, block_size=32, n_layer=4, n_head=4, n_embd=n_embd))


def train_steps(model: torch.nn.Module, vocab: int, steps: int = 3, T: int = 16) -> None:
    """A few AdamW steps on random tokens; the optimizer sees every parameter, so only freezing
    (no gradient) keeps the base weights fixed."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(vocab, (2, T + 1), generator=generator)
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def tokens(vocab: int, T: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randint(vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def saved_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def assert_merge_round_trip(model: torch.nn.Module, frozen: dict, layers: int, changed: str) -> None:
    """Merged and unmerged logits agree within 1e-5, merging changes the weight ``changed``, and
    unmerging restores every base weight in ``frozen`` within 1e-6."""
    model.eval()
    idx = tokens(50)
    with torch.no_grad():
        unmerged = model(idx)
        assert merge_lora(model) == layers
        merged = model(idx)
        merged_weight = model.state_dict()[changed].clone()
        unmerge_lora(model)
        again = model(idx)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=1e-5, rtol=0)
    assert not torch.allclose(merged_weight, frozen[changed], atol=1e-6), "merge changed no weight"
    for k, v in frozen.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- LoRA


def test_lora_trains_r_times_in_plus_out_per_layer():
    model = larger_gpt(n_embd=256)
    base_total = count_trainable(model)[1]
    shapes = {name: (m.in_features, m.out_features)
              for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    wrapped = apply_lora(model, ATTENTION_AND_MLP, rank=8)
    assert sorted(wrapped) == sorted(f"h.{i}.{layer}" for i in range(4)
                                     for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(isinstance(model.get_submodule(name), LoRALinear) for name in wrapped)
    expected = sum(8 * (shapes[name][0] + shapes[name][1]) for name in wrapped)
    # per block 8·(256+768) + 8·(256+256) + 8·(256+1024) + 8·(1024+256) = 32,768; 4 blocks: 131,072
    assert expected == 131_072
    trainable, total = count_trainable(model)
    assert (trainable, total) == (expected, base_total + expected)
    # at d=256 with every attention and MLP matrix wrapped that is 3.7% of the model, not ≤ 1%
    assert trainable / total == pytest.approx(131_072 / 3_554_816)


def test_lora_on_c_attn_only_trains_under_one_percent_at_width_512():
    model = larger_gpt(n_embd=512)
    apply_lora(model, "c_attn", rank=8)
    trainable, total = count_trainable(model)
    # LoRA: 4 layers · 8·(512 + 1536) = 65,536.
    # Base: per block ln 2·1,024 + c_attn 512·1536+1536 + attn.c_proj 512²+512 + c_fc 512·2048+2048
    #       + mlp.c_proj 2048·512+512 = 3,152,384; 4 blocks 12,609,536; + wte 1000·512 + wpe 32·512
    #       + ln_f 1,024 (lm_head tied) = 13,138,944.  65,536 / (13,138,944 + 65,536) = 0.496%
    assert (trainable, total) == (65_536, 13_138_944 + 65_536)
    assert trainable / total < 0.01


def test_lora_merge_unmerge_and_only_lora_trains():
    model = tiny_gpt()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ATTENTION_AND_MLP, rank=4)
    train_steps(model, vocab=50)
    state = model.state_dict()
    lora_keys = set(lora_state_dict(model))
    assert lora_keys and set(state) == set(frozen) | lora_keys
    assert all(torch.equal(state[k], v) for k, v in frozen.items()), "a base weight changed during training"
    assert all(state[k].abs().sum() > 0 for k in lora_keys if k.endswith("lora_B")), "B should have trained away from 0"

    assert_merge_round_trip(model, frozen, layers=8, changed="h.0.attn.c_attn.weight")


def test_lora_on_the_token_embedding_trains_a_rank_r_correction_and_merges_when_untied():
    model = tiny_gpt(tie_embeddings=False)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_lora(model, "wte", rank=4, alpha=8.0) == ["wte"]
    assert isinstance(model.wte, LoRAEmbedding)
    # A (4, 50) and B (32, 4): 4·(50 + 32) numbers, nothing else trains
    assert count_trainable(model)[0] == 4 * (50 + 32)
    train_steps(model, vocab=50)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items()), "a base weight changed"
    assert model.wte.lora_A.abs().sum() > 0, "A should have trained away from 0"
    assert_merge_round_trip(model, frozen, layers=1, changed="wte.weight")


def test_lora_on_a_tied_embedding_adapts_inputs_only_and_merges_by_untying_the_head():
    model = tiny_gpt()  # wte tied to lm_head
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ["wte", "c_attn"], rank=4)
    assert model.lm_head.weight is model.wte.weight, "wrapping wte broke the tie"
    train_steps(model, vocab=50)
    assert model.wte.lora_A.abs().sum() > 0, "A should have trained away from 0"
    merge_lora(model)
    assert model.lm_head.weight is not model.wte.weight  # merged: the head kept the base table
    torch.testing.assert_close(model.lm_head.weight, frozen["lm_head.weight"], atol=0, rtol=0)
    unmerge_lora(model)
    assert model.lm_head.weight is model.wte.weight, "unmerge should tie the head to the table again"
    assert_merge_round_trip(model, frozen, layers=3, changed="wte.weight")


def test_lora_adapter_checkpoint_is_small_and_reproduces_the_logits(tmp_path):
    base = larger_gpt(n_embd=256)
    model = copy.deepcopy(base)
    apply_lora(model, ATTENTION_AND_MLP, rank=8)
    train_steps(model, vocab=1000, steps=2)
    adapter, full = lora_state_dict(model), model.state_dict()
    ratio = saved_bytes(adapter) / saved_bytes(full)
    assert ratio <= 0.05, f"adapter checkpoint is {ratio:.1%} of the full one"  # ≈ 131,072 / 3,554,816 = 3.7%

    torch.save(adapter, tmp_path / "adapter.pt")
    fresh = copy.deepcopy(base)
    apply_lora(fresh, ATTENTION_AND_MLP, rank=8)
    idx = tokens(1000)
    model.eval(), fresh.eval()
    with torch.no_grad():
        before = fresh(idx)
        load_lora_state_dict(fresh, torch.load(tmp_path / "adapter.pt"))
        expected, loaded = model(idx), fresh(idx)
    assert not torch.allclose(before, expected, atol=1e-4), "the trained adapter should change the logits"
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=0)


def test_lora_adapter_that_does_not_fit_is_refused():
    model = tiny_gpt()
    apply_lora(model, "c_attn", rank=4)
    other = tiny_gpt()
    apply_lora(other, "c_fc", rank=4)
    with pytest.raises(UserError, match=r"missing: h\.0\.attn\.c_attn\.lora_A.*unexpected: h\.0\.mlp\.c_fc\.lora_A"):
        load_lora_state_dict(model, lora_state_dict(other))
    wider = tiny_gpt()
    apply_lora(wider, "c_attn", rank=2)
    with pytest.raises(UserError, match="rank"):
        load_lora_state_dict(model, lora_state_dict(wider))


def test_lora_target_that_matches_nothing_names_the_target():
    target = r"h\.\d+\.attn\.q_proj"
    listed = r".*h\.0\.attn\.c_attn, h\.0\.attn\.c_proj"  # the error shows real layer names
    with pytest.raises(UserError, match=re.escape(f"'{target}'") + listed) as error:
        apply_lora(tiny_gpt(), target)
    assert "matches no nn.Linear" in str(error.value)


def test_lora_regex_and_suffix_targets():
    assert apply_lora(tiny_gpt(), r"h\.1\.mlp\..*") == ["h.1.mlp.c_fc", "h.1.mlp.c_proj"]
    assert apply_lora(tiny_gpt(), "attn.c_proj") == ["h.0.attn.c_proj", "h.1.attn.c_proj"]


def test_lora_refuses_a_tied_output_head_and_wraps_an_untied_one():
    with pytest.raises(UserError, match="lm_head.*tied"):
        apply_lora(tiny_gpt(), "lm_head")
    with pytest.warns(UserWarning, match="skipping lm_head"):
        wrapped = apply_lora(tiny_gpt(), ".*")
    assert "lm_head" not in wrapped and len(wrapped) == 10  # 8 linear layers and the embeddings wte, wpe
    untied = tiny_gpt(tie_embeddings=False)
    assert apply_lora(untied, "lm_head") == ["lm_head"]
    assert not untied.wte.weight.requires_grad


# ---------------------------------------------------------------- adapters


def test_adapters_start_as_identity_and_only_they_train():
    model = tiny_gpt()
    idx = tokens(50)
    with torch.no_grad():
        before = model(idx)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_adapters(model, bottleneck=4) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=1e-6, rtol=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".mlp.adapter." in name for name in trainable)
    assert count_trainable(model)[0] == 2 * (32 * 4 + 4 + 4 * 32 + 32)
    train_steps(model, vocab=50)
    with torch.no_grad():
        assert not torch.allclose(model(idx), before, atol=1e-4), "training the adapters should change the output"
    state = model.state_dict()
    assert all(torch.equal(state[k.replace(".mlp.", ".mlp.sublayer.")], v) for k, v in frozen.items() if ".mlp." in k)
    assert all(torch.equal(state[k], v) for k, v in frozen.items() if ".mlp." not in k)


def test_adapters_after_attention_and_mlp():
    model = tiny_gpt()
    idx = tokens(50)
    with torch.no_grad():
        before = model(idx)
    assert apply_adapters(model, bottleneck=4, after="both") == 4
    with torch.no_grad():
        torch.testing.assert_close(model(idx), before, atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="after='ffn'"):
        apply_adapters(tiny_gpt(), after="ffn")


# ---------------------------------------------------------------- prompt tuning


def test_soft_prompt_is_the_only_trainable_part_and_steers_the_logits():
    model = PromptTunedGPT(tiny_gpt(), n_tokens=5)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["prompt.weight"]
    assert count_trainable(model)[0] == 5 * 32
    idx = tokens(50, T=10)
    logits = model(idx)
    assert logits.shape == (2, 10, 50)
    frozen = {k: v.clone() for k, v in model.model.state_dict().items()}
    prompt = model.prompt.weight.detach().clone()
    train_steps(model, vocab=50, T=10)
    assert not torch.equal(model.prompt.weight, prompt)
    assert all(torch.equal(model.model.state_dict()[k], v) for k, v in frozen.items())
    with torch.no_grad():
        model.prompt.weight.normal_()
        assert not torch.allclose(model(idx), logits, atol=1e-4), "a different prompt should change the logits"


@pytest.mark.parametrize("position", ["learned", "rope", "none", "sinusoidal", "alibi", "t5"])
def test_soft_prompt_of_token_embeddings_equals_prepending_those_tokens(position):
    gpt = tiny_gpt(position=position).eval()
    model = PromptTunedGPT(gpt, n_tokens=4)
    prompt_ids = torch.tensor([3, 1, 4, 1])
    with torch.no_grad():
        model.prompt.weight.copy_(gpt.wte.weight[prompt_ids])
        idx = tokens(50, T=8)
        expected = gpt(torch.cat([prompt_ids.expand(2, -1), idx], dim=1))[:, 4:]
        torch.testing.assert_close(model(idx), expected, atol=1e-5, rtol=0)


def test_soft_prompt_context_overflow_is_a_user_error():
    model = PromptTunedGPT(tiny_gpt(), n_tokens=5)
    assert model.context_length == 27
    model(tokens(50, T=27))
    with pytest.raises(UserError, match="28 tokens after the 5-token soft prompt exceeds the context of 32"):
        model(tokens(50, T=28))
    with pytest.raises(UserError, match="n_tokens=32"):
        PromptTunedGPT(tiny_gpt(), n_tokens=32)
