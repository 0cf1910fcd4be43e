"""Warmup-stable-decay ladders: the cooldown schedule continues from the stable lr and reaches its target, and the
two-step sweep of sweeps/wsd_ladder.yaml (stable runs with branch checkpoints, then cooldown branches, each its own
tracked run) records every branch's N, D and C for `scaling fit`."""

import csv
import itertools
import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lm_lightning.errors import UserError
from lm_lightning.tasks.schedules import cooldown, warmup_constant

from helpers import REPO, run_in_process


def optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def lrs(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def stable_state(step, warmup=2):
    """A stable run's scheduler state at ``step`` (what a branch checkpoint holds)."""
    stable = warmup_constant(optimizer(), warmup_steps=warmup)
    lrs(stable, step)
    return stable.state_dict()


@pytest.mark.parametrize("shape, fall", [("linear", lambda p: p), ("1-sqrt", math.sqrt)])
def test_cooldown_starts_at_the_checkpoints_step_from_the_stable_lr_and_ends_at_the_minimum(shape, fall):
    branch = cooldown(optimizer(), total_steps=30, warmup_steps=2, min_lr_ratio=0.1, shape=shape)
    branch.load_state_dict(stable_state(20))  # as Lightning restores the stable run's scheduler into the branch
    assert branch.decay_start == 20
    branch.optimizer.param_groups[0]["lr"] = 1.0  # the restored optimizer holds the stable lr
    seen = lrs(branch, 10)
    assert seen[0] == 1.0  # the first cooldown step runs at the stable lr: no jump
    assert seen == pytest.approx([1 - fall(k / 10) * 0.9 for k in range(10)])
    assert branch.get_last_lr()[0] == pytest.approx(0.1)  # after the last step: min_lr_ratio x lr


def test_a_branch_resumed_from_its_own_checkpoint_keeps_its_start():
    branch = cooldown(optimizer(), total_steps=30)
    branch.load_state_dict(stable_state(20))
    lrs(branch, 5)
    resumed = cooldown(optimizer(), total_steps=30)
    resumed.load_state_dict(branch.state_dict())
    assert resumed.decay_start == 20 and resumed.last_epoch == 25
    assert resumed.get_last_lr()[0] == pytest.approx(0.5)


def test_a_branch_must_end_after_its_checkpoint():
    with pytest.raises(UserError, match="step 20, not below trainer.max_steps=20"):
        cooldown(optimizer(), total_steps=20).load_state_dict(stable_state(20))
    with pytest.raises(UserError, match="linear or 1-sqrt"):
        cooldown(optimizer(), total_steps=20, shape="cosine")


def test_each_branch_of_the_ladder_sweep_starts_from_a_checkpoint_its_stable_run_saves():
    with initialize_config_dir(config_dir=str(REPO / "sweeps"), version_base="1.3"):
        stable = compose("wsd_ladder", ["hydra.searchpath=[file://" + str(REPO / "lm_lightning" / "conf") + "]"],
                         return_hydra_config=True)
        branches = compose("wsd_ladder_branches", ["hydra.searchpath=[file://" + str(REPO / "lm_lightning" / "conf")
                                                   + "]"], return_hydra_config=True)
    saved = stable.callbacks.branch_points.steps
    assert stable.trainer.max_steps == max(saved) and stable.scheduler._target_.endswith("warmup_constant")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = OverridesParser.create().parse_override(f"branch={branches.hydra.sweeper.params.branch}")
    points = list(sweep.sweep_iterator())
    assert sorted(p["step"] for p in points) == sorted(saved)
    assert all(p["end"] > p["step"] and p["end"] - p["step"] == pytest.approx(0.2 * p["end"], abs=1) for p in points)
    assert branches.hydra.sweeper.params.scheduler == "wsd_branch" and branches.callbacks.branch_points is None
    stable_folder = f"{stable.hydra.sweep.dir}/{stable.hydra.sweep.subdir}"
    assert OmegaConf.to_container(branches, resolve=False)["ckpt_path"].startswith("${stable_dir}/")
    assert branches.ckpt_path == f"{stable_folder}/checkpoints/branch-step{branches.branch.step}.ckpt"


def test_ladder_recipe_stable_run_then_cooldown_branches_are_tracked_runs_with_N_D_C(tmp_path, corpus_cache):
    """The README's two steps on Tiny Shakespeare characters: one stable run saving at steps 6 and 12, then its
    two cooldown branches (to 8 and 15 steps), each its own run; `scaling fit` reads the branches only."""
    logs = tmp_path / "logs"
    small = ["--config-dir", str(REPO / "sweeps"), "data=tinyshakespeare", "tokenizer=char", "model.n_layer=1",
             "model.block_size=32", "data.batch_size=4", "data.val_batch_size=8", "trainer.limit_val_batches=2",
             "scheduler.warmup_steps=2", "trainer.val_check_interval=6", "trainer.log_every_n_steps=1", "logger=csv", f"paths.log_dir={logs}", "seed=3"]
    run_in_process("train", "-m", "--config-name", "wsd_ladder", *small, "trainer.max_steps=12",
                   "callbacks.branch_points.steps=[6,12]", cwd=tmp_path, cache=corpus_cache)
    stable_dir = logs / "wsd_ladder" / "stable" / "L1_s3"
    assert sorted(p.name for p in (stable_dir / "checkpoints").glob("branch-*.ckpt")) == ["branch-step12.ckpt",
                                                                                         "branch-step6.ckpt"]
    run_in_process("train", "-m", "--config-name", "wsd_ladder_branches", *small,
                   "branch={step: 6, end: 8},{step: 12, end: 15}", cwd=tmp_path, cache=corpus_cache)
    stable = json.loads((stable_dir / "run.json").read_text())
    tokens_per_step = 4 * 32
    for steps, start in ((8, 6), (15, 12)):
        run = logs / "wsd_ladder" / "branches" / f"L1_s3_T{steps}"
        record = json.loads((run / "run.json").read_text())
        assert record["status"] == "finished" and record["steps"] == steps
        assert record["compute"]["N"] == stable["compute"]["N"] > 0  # the stable run's model
        assert record["tokens_trained"] == record["compute"]["D"] == steps * tokens_per_step  # stable + cooldown
        assert record["training_flops"] == record["compute"]["C"] == pytest.approx(
            stable["flops_per_token"] * steps * tokens_per_step)
        logged = {}
        rows = list(csv.DictReader(next(run.glob("csv/*/metrics.csv")).read_text().splitlines()))
        for row in rows:
            for key, value in row.items():
                if key.startswith("lr-") and value:
                    logged.setdefault(int(row["step"]), float(value))
        peak = stable["config"]["optimizer"]["lr"]
        assert min(logged) == start and logged[start] == pytest.approx(peak)  # continues from the stable lr
        cooling = [logged[s] for s in sorted(logged)]
        assert all(a > b for a, b in itertools.pairwise(cooling))
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)
    proc = run_in_process("scaling", "fit", f"runs=[{logs / 'wsd_ladder'}]", "laws=[D]", "tracker=null",
                          "holdout_largest=false", "n_bootstrap=20", cwd=tmp_path, cache=corpus_cache, check=False)
    assert "the stable phase of a WSD ladder" in proc.stdout + proc.stderr  # the constant-lr run is no data point
    assert "the 2 runs found vary too little" in proc.stderr  # the two branches alone (3 token counts needed)
