"""Optimizer and schedule choices: hand-computed schedule values; every optimizer config trains."""

from __future__ import annotations

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.optim.lr_scheduler import LambdaLR

from lm_lightning.errors import UserError
from lm_lightning.models.gpt import GPT, GPTConfig
from lm_lightning.objectives.causal_lm import CausalLM
from lm_lightning.config.app import CONF_DIR
from lm_lightning.tasks import schedules
from lm_lightning.tasks.param_groups import parameter_groups

from helpers import REPO


def lrs(make, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler: LambdaLR = make(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_linear_by_hand():
    got = lrs(lambda o: schedules.warmup_linear(o, total_steps=12, warmup_steps=2, min_lr_ratio=0.5), 15)
    # warmup 2·1/3, 2·2/3; then 2·(1 − 0.5·(s−2)/10) down to 1.0 at step 12, and 1.0 after
    expected = [2 / 3, 4 / 3] + [2 * (1 - 0.5 * (s - 2) / 10) for s in range(2, 13)] + [1.0, 1.0]
    assert got == pytest.approx(expected)


def test_warmup_constant_by_hand():
    assert lrs(lambda o: schedules.warmup_constant(o, warmup_steps=3), 6) == pytest.approx([0.5, 1.0, 1.5, 2, 2, 2])


def test_warmup_stable_decay_by_hand():
    got = lrs(lambda o: schedules.warmup_stable_decay(o, total_steps=10, warmup_steps=1, decay_fraction=0.4), 12)
    # warmup: 2·1/2; stable at 2 for steps 1-5; decay starts at 10 − 4 = 6: 2·(1 − (s−6)/4) to 0 at 10
    expected = [1.0, 2, 2, 2, 2, 2, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("make", [
    lambda o: schedules.warmup_linear(o, total_steps=5, warmup_steps=5),
    lambda o: schedules.warmup_stable_decay(o, total_steps=5, warmup_steps=10),
    lambda o: schedules.warmup_stable_decay(o, total_steps=50, decay_fraction=1.5),
])
def test_bad_schedule_settings_name_the_option(make):
    with pytest.raises(UserError, match="scheduler\\."):
        make(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))


OPTIMIZERS = sorted(p.stem for p in (REPO / "lm_lightning" / "conf" / "optimizer").glob("*.yaml"))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_config_lowers_the_loss_of_a_tiny_gpt(name):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"optimizer={name}"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=1, n_head=2, n_embd=32))
    factory = hydra.utils.instantiate(cfg.optimizer)
    optimizer = factory(params=parameter_groups(model, factory.keywords.get("weight_decay", 0.0)))
    batch = torch.randint(16, (4, 17), generator=torch.Generator().manual_seed(1))
    objective = CausalLM()
    first = objective(model, batch).loss.item()
    for _ in range(30):
        optimizer.zero_grad()
        objective(model, batch).loss.backward()
        optimizer.step()
    assert objective(model, batch).loss.item() < 0.8 * first, name
