"""Acceptance 3 of issue 7: the estimator's static memory for a 7B model, and its activations against
the peak memory of a real CPU step."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lm_lightning.models.memory import activation_bytes, estimate, per_device
from lm_lightning.models.gpt import build_gpt

from helpers import run_in_process

SEVEN_B = ["model.n_layer=32", "model.n_embd=4096", "model.n_head=32", "model.block_size=4096", "vocab_size=65536",
           "model.tie_embeddings=false"]


def test_7b_with_16_bit_weights_and_gradients_and_fp32_adam_moments_needs_84_gb(tmp_path):
    out = run_in_process("estimate", *SEVEN_B, "precision=bf16_true", "optimizer_state_dtype=float32",
                         cwd=tmp_path, cache=tmp_path / "cache").stdout
    params = int(re.search(r"parameters: ([\d,]+)", out).group(1).replace(",", ""))
    weights, grads, states, total = map(float, re.search(
        r"weights ([\d.]+) GB \+ gradients ([\d.]+) GB \+ optimizer states ([\d.]+) GB = ([\d.]+) GB", out).groups())
    assert abs(params - 7e9) < 0.01e9
    assert (round(weights), round(grads), round(states)) == (14, 14, 56)
    assert abs(total - 84) <= 1
    assert not (tmp_path / "outputs").exists()  # an estimate writes no run folder


def test_sharding_divides_what_each_strategy_shards():
    est = estimate({"vocab_size": 256, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}, "32-true", "adamw", 4)
    ddp, zero2, fsdp2 = (per_device(est, s, 4) for s in ("ddp", "zero2", "fsdp2"))
    assert ddp["weights"] == est.weights and ddp["optimizer_states"] == 2 * est.weights
    assert zero2["weights"] == est.weights and zero2["gradients"] == est.gradients / 4
    assert fsdp2["weights"] == est.weights / 4 and fsdp2["total"] < zero2["total"] < ddp["total"]
    assert est.activations_checkpointed < est.activations


@pytest.mark.parametrize("shape", [(2, 64, 2, 64, 256, 8), (4, 128, 4, 128, 512, 8), (6, 256, 8, 128, 1024, 4)],
                         ids=["2x64", "4x128", "6x256"])
def test_activation_estimate_is_within_20_percent_of_a_measured_cpu_step(shape):
    from torch.distributed._tools.mem_tracker import MemTracker

    n_layer, n_embd, n_head, block, vocab, batch = shape
    model = build_gpt(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=False)
    tokens = torch.randint(vocab, (batch, block + 1))
    tracker = MemTracker()
    tracker.track_external(model, tokens)
    with tracker:
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    measured = peak - sum(p.numel() * p.element_size() for p in model.parameters())  # what the step adds to the weights
    estimated = activation_bytes(batch, block, n_layer, n_embd, vocab, element_bytes=4)
    assert abs(estimated / measured - 1) <= 0.20, (estimated, measured)
