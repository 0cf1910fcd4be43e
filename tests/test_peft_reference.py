"""The platform's LoRA against Hugging Face ``peft`` on the same plain ``torch.nn`` GPT: with the
same A and B matrices both give the same logits, the same merged weights, and train the same
parameter count (``peft`` is in the test extra; the core install does not need it)."""

from __future__ import annotations

import copy

import pytest
import torch

from lm_lightning.adaptation.peft import apply_lora, count_trainable, merge_lora
from lm_lightning.models.gpt import GPT, GPTConfig

peft = pytest.importorskip("peft")

TARGETS = ["c_attn", "c_fc"]


def lora_pair(rank: int = 4, alpha: float = 8.0):
    """(ours, theirs): one GPT wrapped by apply_lora and by peft, with the same non-zero A and B."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    ours = copy.deepcopy(base)
    wrapped = apply_lora(ours, TARGETS, rank=rank, alpha=alpha)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                                       target_modules=TARGETS, bias="none"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in wrapped:
            layer = ours.get_submodule(name)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.1)  # B starts at 0: move it
            reference = theirs.base_model.model.get_submodule(name)
            reference.lora_A["default"].weight.copy_(layer.lora_A)
            reference.lora_B["default"].weight.copy_(layer.lora_B)
    return ours.eval(), theirs.eval(), wrapped


def test_same_lora_matrices_give_the_same_logits_as_peft():
    ours, theirs, wrapped = lora_pair()
    assert sorted(wrapped) == sorted(f"h.{i}.{t}" for i in range(2) for t in ("attn.c_attn", "mlp.c_fc"))
    idx = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(idx)
        got = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_lora_moves_the_logits_in_both_implementations():
    ours, theirs, _ = lora_pair()
    idx = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with theirs.disable_adapter():
            base = theirs(idx)
        assert (ours(idx) - base).abs().max() > 1e-3


def test_merged_weights_equal_peft_merge_and_unload():
    ours, theirs, wrapped = lora_pair()
    merge_lora(ours)
    merged = theirs.merge_and_unload()
    for name in wrapped:
        torch.testing.assert_close(ours.get_submodule(name).weight, merged.get_submodule(name).weight, atol=1e-6, rtol=0)


def test_trainable_parameter_count_matches_peft():
    ours, theirs, _ = lora_pair(rank=8, alpha=16.0)
    peft_trainable, peft_total = theirs.get_nb_trainable_parameters()
    assert count_trainable(ours) == (peft_trainable, peft_total)


@pytest.mark.parametrize("tie", [True, False])
def test_lora_on_the_token_embedding_matches_peft(tie):
    """LoRA on ``wte`` (peft's ``lora_embedding_A``/``_B``): same logits with the same matrices, same
    parameter counts; untied, the same merged table as ``merge_and_unload``."""
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tie))
    ours = copy.deepcopy(base)
    assert apply_lora(ours, ["wte"], rank=4, alpha=8.0) == ["wte"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=["wte"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer, reference = ours.wte, theirs.base_model.model.wte
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.1)  # A starts at 0: move it
        reference.lora_embedding_A["default"].copy_(layer.lora_A)
        reference.lora_embedding_B["default"].copy_(layer.lora_B)
    ours.eval(), theirs.eval()
    idx = torch.randint(64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx), atol=1e-6, rtol=0)
        with theirs.disable_adapter():
            assert (ours(idx) - theirs(idx)).abs().max() > 1e-3
    assert count_trainable(ours) == theirs.get_nb_trainable_parameters()
    if not tie:
        merge_lora(ours)
        torch.testing.assert_close(ours.wte.weight, theirs.merge_and_unload().wte.weight, atol=1e-6, rtol=0)
