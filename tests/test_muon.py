"""optimizer=muon (issue 22): torch's Muon on hidden matrices and torch's AdamW on the rest, as one optimizer that
schedules, checkpoints and resumes as one."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from helpers import run_in_process, step_losses
from torch import nn

from lm_lightning.errors import UserError
from lm_lightning.tasks.param_groups import parameter_groups
from lm_lightning.training.muon import MuonAdamW

MUON = {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
        "adjust_lr_fn": "match_rms_adamw"}
ADAMW = {"lr": 0.003, "betas": (0.9, 0.99), "eps": 1e-8}


class Tiny(nn.Module):
    """An embedding, two hidden matrices (one rectangular), a norm and an untied head: every role."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.up, self.down = nn.Linear(8, 24), nn.Linear(24, 8, bias=False)
        self.ln = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln(self.down(torch.relu(self.up(self.wte(idx))))))


def loss_of(model: nn.Module, seed: int) -> torch.Tensor:
    idx = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(seed))
    return nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.roll(1, 1).flatten())


def muon_adamw(model: nn.Module) -> MuonAdamW:
    return MuonAdamW(parameter_groups(model, weight_decay=0.1), **MUON, adamw_lr=ADAMW["lr"], betas=ADAMW["betas"])


def train(model: nn.Module, optimizer: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        optimizer.zero_grad()
        loss_of(model, seed).backward()
        optimizer.step()


def test_hidden_matrices_take_torchs_muon_step_and_the_rest_torchs_adamw_step_exactly():
    torch.manual_seed(0)
    model = Tiny()
    reference = copy.deepcopy(model)
    hidden = [reference.up.weight, reference.down.weight]
    others = [p for p in reference.parameters() if all(p is not h for h in hidden)]
    muon = torch.optim.Muon(hidden, **MUON)
    adamw = torch.optim.AdamW([{"params": [reference.wte.weight, reference.lm_head.weight], "weight_decay": 0.1},
                               {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0}], **ADAMW)
    optimizer = muon_adamw(model)
    assert [g["role"] for g in optimizer.param_groups] == ["hidden", "embedding", "head", "vector"]
    assert [g["use_muon"] for g in optimizer.param_groups] == [True, False, False, False]

    train(model, optimizer, range(3))
    for seed in range(3):
        muon.zero_grad(), adamw.zero_grad()
        loss_of(reference, seed).backward()
        muon.step(), adamw.step()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(got, want), name


def test_the_update_of_a_hidden_matrix_is_orthogonalised_and_the_others_are_not():
    torch.manual_seed(0)
    model = Tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, muon_adamw(model), range(1))
    update = model.up.weight.detach() - before["up.weight"] * (1 - MUON["lr"] * MUON["weight_decay"])
    singular = torch.linalg.svdvals(update)
    # Newton-Schulz maps every singular value of the momentum into ~[0.5, 1.5] (torch's docs), times the adjusted
    # lr 0.2·√max(24, 8)·lr; the gradient's own singular values spread over more than a factor 10 (here 13)
    scale = 0.2 * 24 ** 0.5 * MUON["lr"]
    assert singular.min() > 0.5 * scale and singular.max() < 1.5 * scale, singular / scale
    gradient = torch.linalg.svdvals(model.up.weight.grad)
    assert gradient.max() / gradient.min() > 10
    # AdamW's first step moves every entry by lr (sign of the gradient), unrelated to its singular values
    head = (model.lm_head.weight.detach() - before["lm_head.weight"] * (1 - ADAMW["lr"] * 0.1)).abs()
    torch.testing.assert_close(head, torch.full_like(head, ADAMW["lr"]), rtol=1e-3, atol=0)


def test_a_scheduler_and_a_changed_group_lr_scale_the_steps_of_both_halves():
    torch.manual_seed(0)
    model = Tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    halved, frozen = copy.deepcopy(model), copy.deepcopy(model)
    train(model, muon_adamw(model), range(1))
    optimizer = muon_adamw(halved)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    train(halved, optimizer, range(1))
    for (name, full), half in zip(model.named_parameters(), halved.parameters()):
        torch.testing.assert_close(half - before[name], 0.5 * (full - before[name]), rtol=1e-3, atol=1e-6)
    optimizer = muon_adamw(frozen)
    optimizer.param_groups[0]["lr"] = 0.0  # what μP's per-role multipliers do: the live group dict is the one stepped
    train(frozen, optimizer, range(1))
    assert torch.equal(frozen.up.weight, before["up.weight"]) and not torch.equal(frozen.wte.weight, before["wte.weight"])


def test_state_dict_round_trips_through_a_weights_only_load():
    torch.manual_seed(0)
    model = Tiny()
    optimizer = muon_adamw(model)
    train(model, optimizer, range(2))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    restored_model = copy.deepcopy(model)
    restored = muon_adamw(restored_model)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert set(restored.state[restored_model.up.weight]) == {"momentum_buffer"}
    assert set(restored.state[restored_model.wte.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    train(model, optimizer, range(2, 4))
    train(restored_model, restored, range(2, 4))
    for (name, got), want in zip(restored_model.named_parameters(), model.parameters()):
        assert torch.equal(got, want), name


def test_groups_without_roles_and_muon_on_non_matrices_are_refused_with_one_line():
    model = Tiny()
    with pytest.raises(UserError, match="optimizer=muon needs parameter groups that name their role"):
        MuonAdamW([{"params": [model.up.weight], "weight_decay": 0.1}])
    with pytest.raises(UserError, match=r"2-D matrices only.*\(8, 8, 3\)"):
        MuonAdamW([{"params": [nn.Parameter(torch.zeros(8, 8, 3))], "role": "hidden"}])


TINY = ["experiment=tiny", "optimizer=muon", "logger=csv", "trainer.log_every_n_steps=1", "trainer.val_check_interval=20",
        "callbacks.last_checkpoint.every_n_train_steps=20", "scheduler.total_steps=40", "sample.max_new_tokens=0",
        "optimizer.lr=1e-2"]


def test_lm_lightning_train_with_muon_learns_and_resumes_exactly(tmp_path, corpus_cache):
    full, part = tmp_path / "full", tmp_path / "part"
    run_in_process("train", *TINY, "trainer.max_steps=40", f"hydra.run.dir={full}", cwd=tmp_path, cache=corpus_cache)
    run_in_process("train", *TINY, "trainer.max_steps=20", f"hydra.run.dir={part}", cwd=tmp_path, cache=corpus_cache)
    run_in_process("train", *TINY, "trainer.max_steps=40", f"hydra.run.dir={part}", "ckpt_path=last", cwd=tmp_path,
                   cache=corpus_cache)

    record = json.loads((full / "run.json").read_text())
    assert record["final"]["val/loss"] < record["initial_loss"] - 0.8, (record["initial_loss"], record["final"])
    checkpoint = torch.load(part / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    (state,) = checkpoint["optimizer_states"]  # one optimizer: both halves' groups and states
    assert [(g["role"], g["use_muon"]) for g in state["param_groups"]] == [
        ("hidden", True), ("embedding", False), ("vector", False)]  # tiny ties its head to the embedding
    reference, resumed = step_losses(full), step_losses(part)
    assert sorted(resumed) == list(range(40))
    for step in range(20, 40):
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])
