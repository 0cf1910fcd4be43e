"""Int8 quantization: each int8 linear layer stays within half a rounding step of fp32, a GPT's linear
weights shrink about 4×, quantization-aware training computes exactly what the converted int8 model
computes, layers without int8 kernels are refused in one line, and the command quantizes a checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from helpers import run_in_process
from lm_lightning.compression.quantize import (
    FakeQuantLinear,
    Int8Linear,
    check_supported,
    linear_weight_bytes,
    load_int8,
    prepare_qat,
    quantize_linears,
    quantize_symmetric,
    state_dict_bytes,
)
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.training.loading import load_trained
from test_zoo import build

V = 50


def small_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=64, bias=True) | overrides
    return GPT(GPTConfig(**config)).eval()


def test_symmetric_quantization_keeps_each_value_within_half_a_step():
    x = torch.randn(5, 40) * torch.logspace(-3, 1, 5)[:, None]  # rows of very different ranges
    q, scale = quantize_symmetric(x)
    assert q.dtype == torch.int8 and scale.shape == (5, 1)
    assert q.abs().max(dim=1).values.tolist() == [127] * 5  # each row's largest value maps to ±127
    assert ((q.float() * scale - x).abs() <= scale / 2 + 1e-7).all()


@torch.no_grad()
def test_int8_linear_output_error_is_bounded_by_the_rounding_steps():
    torch.manual_seed(0)
    linear = nn.Linear(48, 24)
    x = torch.randn(3, 7, 48)
    exact = linear(x)
    w_scale = quantize_symmetric(linear.weight)[1].squeeze(1)  # (out,)
    # weight-only: |Δy_j| ≤ Σ_i |x_i| · s_j / 2
    weight_only = Int8Linear.from_linear(linear, activations=False)(x)
    bound = x.abs().sum(-1, keepdim=True) * w_scale / 2
    assert ((weight_only - exact).abs() <= bound + 1e-5).all()
    # dynamic: both factors rounded, |Δy_j| ≤ Σ_i |x_i| · s_j / 2 + (|w_ji| + s_j / 2) · s_x / 2
    dynamic = Int8Linear.from_linear(linear, activations=True)(x)
    x_scale = quantize_symmetric(x)[1]  # (3, 7, 1)
    bound = bound + x_scale / 2 * (linear.weight.abs() + w_scale[:, None] / 2).sum(-1)
    assert ((dynamic - exact).abs() <= bound + 1e-5).all()
    assert not torch.equal(dynamic, weight_only)  # the activations really were rounded


@pytest.mark.parametrize("scheme", ["weight", "dynamic"])
@torch.no_grad()
def test_quantized_gpt_logits_stay_within_one_percent_of_fp32(scheme):
    model = small_gpt()
    idx = torch.randint(V, (4, 16))
    reference = model(idx)
    int8 = copy.deepcopy(model)
    names = quantize_linears(int8, scheme)
    per_block = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert names == [f"h.{i}.{layer}" for i in range(2) for layer in per_block]
    assert type(int8.lm_head) is nn.Linear and int8.lm_head.weight is int8.wte.weight  # tied to wte: stays fp32
    # tolerance: 1% of the largest logit (measured: 0.2% weight-only, 0.4% dynamic)
    torch.testing.assert_close(int8(idx), reference, atol=0.01 * reference.abs().max().item(), rtol=0)


def test_int8_linear_weights_take_a_quarter_of_fp32_plus_one_scale_per_row():
    model = small_gpt()
    fp32_bytes, fp32_state = linear_weight_bytes(model), state_dict_bytes(model)
    d = 64
    assert fp32_bytes == 2 * 4 * (3 * d * d + d * d + 4 * d * d + 4 * d * d)  # 2 blocks, fp32; tied head not counted
    quantize_linears(model, "weight")
    rows = 2 * (3 * d + d + 4 * d + d)
    assert linear_weight_bytes(model) == fp32_bytes // 4 + 4 * rows
    assert fp32_bytes / linear_weight_bytes(model) >= 3.5
    assert state_dict_bytes(model) == fp32_state - 3 * fp32_bytes // 4 + 4 * rows


@pytest.mark.parametrize("activations", [False, True])
def test_quantization_aware_forward_equals_the_converted_int8_forward(activations):
    model = small_gpt()
    fp32_keys = set(model.state_dict())
    prepare_qat(model, activations)
    assert sum(isinstance(m, FakeQuantLinear) for m in model.modules()) == 8
    assert set(model.state_dict()) == fp32_keys  # a QAT checkpoint loads into the plain fp32 model
    idx = torch.randint(V, (2, 16))
    loss = model(idx).logsumexp(-1).mean()
    loss.backward()  # the straight-through gradient reaches every weight
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    int8 = copy.deepcopy(model)
    quantize_linears(int8, "dynamic" if activations else "weight")
    with torch.no_grad():
        torch.testing.assert_close(int8(idx), model(idx), atol=1e-5, rtol=0)


def test_layers_without_int8_kernels_are_refused_in_one_line():
    model = small_gpt()
    with pytest.raises(UserError, match=r"layer 'wte' \(wte\) is an embedding table, which int8 .* does not cover"):
        quantize_linears(model, "weight", layers=["wte"])
    with pytest.raises(UserError, match="ln_1.*is a LayerNorm"):
        quantize_linears(model, "weight", layers=["ln_1"])
    with pytest.raises(UserError, match="tied to the token embedding"):
        quantize_linears(model, "weight", layers=["lm_head"])
    with pytest.raises(UserError, match="matches no layer.*named like h.0.attn.c_attn"):
        quantize_linears(model, "weight", layers=["q_proj"])
    with pytest.raises(UserError, match="scheme 'int4' is not known"):
        quantize_linears(model, "int4")
    assert quantize_linears(model, "weight", layers=["c_fc"]) == ["h.0.mlp.c_fc", "h.1.mlp.c_fc"]
    with pytest.raises(UserError, match="int8 already"):
        quantize_linears(model, "weight", layers=["c_fc"])
    with pytest.raises(UserError, match="is a LSTM"):
        quantize_linears(build("lstm", V), "weight", layers=["rnn"])
    for family in ("t5", "bert", "lstm"):
        with pytest.raises(UserError, match=f"supports gpt and prefix_lm models; this is a {family} model"):
            check_supported(build(family, V))


def test_quantize_command_on_a_trained_checkpoint(tmp_path, tiny_checkpoint, corpus_cache):
    cache = corpus_cache  # the checkpoint's corpus: its val split is scored, qat trains on its train split
    ckpt = tiny_checkpoint
    common = [f"ckpt_path={ckpt}", "data=tinyshakespeare", "tokenizer=char", "logger=csv", "max_val_batches=2",
              "speed.repeats=1", "speed.new_tokens=8"]
    out = tmp_path / "qat"
    # qat scores the fp32 checkpoint, its post-training int8 and the int8 after fake-quant fine-tuning
    proc = run_in_process("quantize", *common, "method=qat", "trainer.max_steps=3", "scheduler.warmup_steps=1",
                          f"hydra.run.dir={out}", cwd=tmp_path, cache=cache)
    assert "validation perplexity: fp32" in proc.stdout and "CPU tokens/s (1 thread): forward" in proc.stdout
    assert "int8 model:" in proc.stdout  # the README's quantize line ends with where the int8 model is
    record = json.loads((out / "run.json").read_text())
    assert record["scheme"] == "dynamic" and len(record["int8_layers"]) == 8 and record["num_threads"] == 1
    assert set(record["results"]) == {"fp32", "ptq", "qat_fp32", "qat_fake_quant", "qat"}
    assert record["linear_weight_ratio"] >= 3.5
    results = record["results"]
    assert all(results[s]["forward_tokens_per_s"] > 0 and results[s]["generation_tokens_per_s"] > 0
               for s in ("fp32", "ptq", "qat"))
    ppl = {stage: result["val"]["val/perplexity"] for stage, result in results.items()}
    assert abs(ppl["ptq"] / ppl["fp32"] - 1) < 0.03
    assert ppl["qat"] == pytest.approx(ppl["qat_fake_quant"], rel=1e-3)
    # the int8 file reads back with its tokenizer and computes what the fine-tuned fake-quant model computes
    int8_task, tokenizer = load_trained(str(out / "checkpoints" / "int8.pt"))  # what evaluate and generate call
    assert type(load_int8(out / "checkpoints" / "int8.pt")[0].model.h[0].mlp.c_fc) is Int8Linear
    int8 = int8_task.model
    assert isinstance(int8.h[0].mlp.c_fc, Int8Linear) and int8.h[0].mlp.c_fc.activations
    qat, _ = load_trained(str(out / "checkpoints" / "qat.ckpt"))  # an ordinary fp32 checkpoint
    prepare_qat(qat.model, activations=True)
    idx = torch.tensor([tokenizer.encode("ROMEO: What say you?")])
    with torch.no_grad():
        diff = (int8(idx) - qat.model(idx)).abs()
    # the same computation, up to an activation that sits on a rounding boundary of its int8 grid and lands on the
    # other side in integer arithmetic (a ulp of float summation order decides it): one token's row moves by ~1e-4
    assert (diff <= 1e-5).float().mean() > 0.9 and diff.max() < 1e-3, diff.max()

    bad = run_in_process("quantize", *common, "layers=[wte]", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path,
                         cache=cache, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: layer 'wte' (wte) is an embedding table")
