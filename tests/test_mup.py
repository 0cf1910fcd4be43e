"""μP (model.parametrization=mup): the coordinate check of `lm-lightning scaling coordcheck` (issue 22, acceptance 1),
the per-role learning-rate factors in the optimizer's groups, equality with standard at the base width, refusals."""

import csv
import math
from functools import partial

import pytest
import torch
from helpers import run_in_process

from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.tasks.language_model import LanguageModelTask
from lm_lightning.tasks.param_groups import apply_lr_scales, parameter_groups
from lm_lightning.tasks.schedules import warmup_cosine
from lm_lightning.training.muon import MuonAdamW

CAUSAL = {"_target_": "lm_lightning.objectives.causal_lm.CausalLM"}


def gpt(n_embd: int, parametrization: str = "mup", **fields) -> GPT:
    fields = {"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": n_embd, "tie_embeddings": False,
              "mup_base_width": 64, "parametrization": parametrization, **fields}
    return GPT(GPTConfig(**fields))


def test_coordcheck_keeps_every_layer_flat_under_mup_while_standard_logits_grow(tmp_path, corpus_cache):
    out = tmp_path / "check"
    proc = run_in_process("scaling", "coordcheck", "widths=[64,512]", "seeds=[0,1]", "data.batch_size=8",
                          "model.block_size=32", f"output_dir={out}", cwd=tmp_path, cache=corpus_cache)
    assert "mean |activation| after 3 steps" in proc.stdout and (out / "coordcheck.png").stat().st_size > 10_000
    after = {(r["parametrization"], r["layer"], int(r["width"])): float(r["mean_abs"])
             for r in csv.DictReader((out / "coordcheck.csv").read_text().splitlines()) if r["step"] == "3"}
    layers = ["embedding", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "logits"]
    assert sorted({layer for _, layer, _ in after}) == sorted(layers)
    for layer in layers:  # acceptance 1: every layer changes by less than 1.5x from width 64 to 512 under mup
        assert 1 / 1.5 < after["mup", layer, 512] / after["mup", layer, 64] < 1.5, layer
    assert after["standard", "logits", 512] / after["standard", "logits", 64] > 3  # ... and blows up under standard
    assert after["standard", "block0.mlp", 512] / after["standard", "block0.mlp", 64] > 10


def test_mup_is_standard_at_the_base_width_and_scales_away_from_it():
    ids = torch.randint(50, (2, 16))
    torch.manual_seed(0)
    standard = gpt(64, "standard")
    torch.manual_seed(0)
    assert torch.equal(gpt(64)(ids), standard(ids))  # same seed, same numbers: a tuned base run carries over
    wide = gpt(256)  # width multiplier m = 4
    assert wide.h[0].attn.scale == pytest.approx(math.sqrt(16) / 64)  # 1/head size x sqrt(base head size)
    assert wide.output_multiplier == 0.25 and gpt(256, "standard").output_multiplier == 1.0
    assert wide.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # init_std / sqrt(m)
    assert wide.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / 2 / 2, rel=0.05)  # and / sqrt(2 n_layer)
    assert wide.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)  # embeddings keep init_std
    assert wide.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.05)  # the head too (x 1/m in forward)


def test_param_groups_carry_each_roles_lr_scale_and_the_optimizer_applies_it_once():
    groups = {g["role"]: g["lr_scale"] for g in parameter_groups(gpt(256), weight_decay=0.1)}
    assert groups == {"hidden": 0.25, "embedding": 1.0, "head": 1.0, "vector": 1.0}
    assert {g["lr_scale"] for g in parameter_groups(gpt(256, "standard"), 0.1)} == {1.0}
    adamw = torch.optim.AdamW(parameter_groups(gpt(256), 0.1), lr=1e-3)
    apply_lr_scales(adamw)
    assert {g["role"]: g["lr"] for g in adamw.param_groups} == {
        "hidden": 2.5e-4, "embedding": 1e-3, "head": 1e-3, "vector": 1e-3}
    # Muon orthogonalises hidden matrices: spectral norm lr at every width needs no 1/m; its default
    # match_rms_adamw rescaling grows like sqrt(m), which 1/sqrt(m) undoes
    for adjust, hidden_lr in (("original", 1e-3), ("match_rms_adamw", 5e-4)):
        muon = MuonAdamW(parameter_groups(gpt(256, bias=False), 0.1), lr=1e-3, adjust_lr_fn=adjust)
        apply_lr_scales(muon)
        assert {g["role"]: g["lr"] for g in muon.param_groups}["hidden"] == pytest.approx(hidden_lr)
    with pytest.raises(UserError, match="Adam-type optimizers .* not SGD"):
        apply_lr_scales(torch.optim.SGD(parameter_groups(gpt(256), 0.0), lr=0.1))


def test_configure_optimizers_scales_before_the_schedule_and_a_resume_keeps_the_scaled_rates():
    def task() -> LanguageModelTask:
        fields = {"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": 50, "block_size": 16, "n_layer": 1,
                  "n_head": 2, "n_embd": 32, "tie_embeddings": False, "parametrization": "mup", "mup_base_width": 16}
        return LanguageModelTask(fields, CAUSAL, optimizer=partial(torch.optim.AdamW, lr=1e-3),
                                 scheduler=partial(warmup_cosine, total_steps=10, warmup_steps=2, min_lr_ratio=0.1))

    first = task().configure_optimizers()
    optimizer, scheduler = first["optimizer"], first["lr_scheduler"]["scheduler"]
    assert [g["role"] for g in optimizer.param_groups][:2] == ["hidden", "embedding"]
    assert scheduler.base_lrs[:2] == [5e-4, 1e-3]  # the schedule's peak of the hidden group is 1e-3 / m
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    resumed = task().configure_optimizers()  # what Lightning does on resume: build, then load the saved state
    resumed["optimizer"].load_state_dict(optimizer.state_dict())
    resumed["lr_scheduler"]["scheduler"].load_state_dict(scheduler.state_dict())
    assert [g["lr"] for g in resumed["optimizer"].param_groups] == [g["lr"] for g in optimizer.param_groups]
    scheduler.step()
    resumed["lr_scheduler"]["scheduler"].step()
    assert [g["lr"] for g in resumed["optimizer"].param_groups] == [g["lr"] for g in optimizer.param_groups]


@pytest.mark.parametrize("fields, message", [
    ({"tie_embeddings": True}, "parametrization=mup needs model.tie_embeddings=false"),
    ({"n_head": 3}, "model.n_head=3 does not divide model.mup_base_width=64"),
    ({"parametrization": "ntk"}, "model.parametrization='ntk' is not known: choose one of standard, mup"),
])
def test_bad_mup_options_are_refused_in_one_line(fields, message):
    with pytest.raises(UserError, match=message):
        gpt(96, **{"parametrization": "mup", **fields})


def test_families_without_mup_and_coordcheck_on_them_are_refused(tmp_path):
    proc = run_in_process("train", "model=bert", "+model.parametrization=mup", cwd=tmp_path, cache=tmp_path, check=False)
    assert proc.returncode == 2 and "model.parametrization is not an option of EncoderConfig" in proc.stderr
    proc = run_in_process("scaling", "coordcheck", "model=lstm", cwd=tmp_path, cache=tmp_path, check=False)
    assert proc.returncode == 2 and "scaling coordcheck needs a transformer with model.parametrization" in proc.stderr


def test_code_that_reads_hidden_states_gets_the_scaled_logits():
    from lm_lightning.alignment.ppo_rollout import response_outputs

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=64, parametrization="mup",
                          tie_embeddings=False, mup_base_width=16)).eval()
    ids = torch.randint(0, 50, (2, 8))
    positions = torch.tensor([[1, 5], [0, 7]])
    _, logits = response_outputs(model, ids, positions)
    expected = model(ids).gather(1, positions[..., None].expand(-1, -1, 50))
    torch.testing.assert_close(logits, expected)  # PPO's policy reads features: the 1/m multiplier applies there too
    assert model.output_multiplier == 0.25
