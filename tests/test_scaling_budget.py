"""Size knob and compute-budget mode: shapes from depth, steps (and depth) from a FLOP budget,
compute accounting in the run record and the tracker, and `scaling fit` over a real sweep."""

from __future__ import annotations

import json
import math

import pytest

from helpers import offline_wandb_summary, run_in_process
from lm_lightning.scaling.budget import model_figures, plan_budget, shape_for_depth

GPT = {"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": 1024, "block_size": 128, "n_layer": 2,
       "n_head": 2, "n_embd": 64, "bias": False}


@pytest.mark.parametrize("depth, aspect, head, width", [(1, 32, 32, 32), (6, 32, 32, 192), (3, 20, 16, 64), (2, 5, 32, 32)])
def test_width_follows_depth_by_the_aspect_ratio_in_whole_heads(depth, aspect, head, width):
    shape = shape_for_depth(depth, aspect, head)
    assert shape == {"n_layer": depth, "n_embd": width, "n_head": width // head}


@pytest.mark.parametrize("budget", [1e11, 3e12, 2e13, 1e15])
@pytest.mark.parametrize("tokens_per_param", [None, 20.0])
def test_planned_runs_spend_the_budget_within_5_percent(budget, tokens_per_param):
    plan = plan_budget(GPT, budget, tokens_per_step=2048, aspect_ratio=32, head_size=32, tokens_per_param=tokens_per_param)
    assert plan.flops == plan.steps * 2048 * plan.flops_per_token
    assert abs(plan.flops / budget - 1) < 0.05 or plan.steps == 1


def test_tokens_per_param_picks_the_depth_closest_to_the_ratio():
    budget, per_step = 1e14, 2048
    plan = plan_budget(GPT, budget, per_step, aspect_ratio=32, head_size=32, tokens_per_param=20.0)

    def ratio(depth):
        n, fpt = model_figures({**GPT, **shape_for_depth(depth, 32, 32)})
        return budget / fpt / n

    chosen = abs(math.log(ratio(plan.n_layer) / 20))
    assert chosen <= abs(math.log(ratio(plan.n_layer - 1) / 20)) and chosen <= abs(math.log(ratio(plan.n_layer + 1) / 20))
    assert ratio(plan.n_layer - 1) > 20 > ratio(plan.n_layer + 1)  # deeper models see fewer tokens per parameter


def test_compute_budget_mode_trains_the_planned_run_and_records_N_D_C(tmp_path, corpus_cache):
    budget = 5e9  # about 130 steps of 256 tokens
    run_dir = tmp_path / "run"
    proc = run_in_process("train", "experiment=tiny", f"scaling.compute_budget={budget}", "scaling.aspect_ratio=16",
                          "scaling.head_size=16", "model.n_layer=2", "scheduler.warmup_steps=1",
                          "trainer.val_check_interval=5", f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=corpus_cache)
    assert "compute budget: n_layer 2, n_embd 32, n_head 2" in proc.stdout + proc.stderr
    record = json.loads((run_dir / "run.json").read_text())
    compute = record["compute"]
    assert abs(compute["C"] / budget - 1) < 0.05
    assert compute["D"] == record["steps"] * 8 * 32  # batch 8 x context 32
    assert compute["N"] == record["parameters"]["non_embedding"] and compute["C_6ND"] == 6 * compute["N"] * compute["D"]
    assert record["config"]["trainer"]["max_steps"] == record["steps"] and record["config"]["model"]["n_embd"] == 32
    assert offline_wandb_summary(run_dir, "compute") == compute  # the tracker run's summary holds N, D, C
    assert offline_wandb_summary(run_dir, "final/val/loss") == pytest.approx(record["final"]["val/loss"])


def test_scaling_fit_reads_a_sweep_back_from_its_run_records(tmp_path, corpus_cache):
    """A 4-size sweep (each its own tracker run), then `scaling fit` on its folder, offline."""
    logs = tmp_path / "logs"
    run_in_process("train", "-m", "experiment=tiny", "model.n_layer=1,2,3,4", "scaling.aspect_ratio=16",
                   "scaling.head_size=16", "trainer.max_steps=40", "trainer.val_check_interval=40",
                   f"paths.log_dir={logs}", "sample.max_new_tokens=0", cwd=tmp_path, cache=corpus_cache)
    sweep = next(logs.glob("tiny/multiruns/*"))
    jobs = sorted(p.parent for p in sweep.glob("*/run.json"))
    assert len(jobs) == 4
    summaries = [offline_wandb_summary(job, "compute") for job in jobs]  # each job its own tracker run
    assert len({s["N"] for s in summaries}) == 4
    assert all(offline_wandb_summary(job, "final/val/loss") > 0 for job in jobs)
    proc = run_in_process("scaling", "fit", f"runs=[{sweep}]", "n_bootstrap=50", "tracker.mode=offline", cwd=tmp_path,
                          cache=tmp_path / "cache")
    assert "scaling fit over 4 runs" in proc.stdout and "L(N)" in proc.stdout
    fits = json.loads((sweep / "scaling_fit" / "fits.json").read_text())
    assert len(fits["runs"]) == 4 and fits["L(N)"]["alpha"] > 0
    assert (sweep / "scaling_fit" / "loss_vs_N.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "W&B run folder:" in proc.stdout


@pytest.mark.parametrize("name", ["scaling_cpu", "data_size_cpu", "isoflop_cpu"])
def test_each_wandb_sweep_drives_the_hydra_sweep_of_the_same_name(name):
    """The W&B sweep's parameters are the Hydra sweep's, and every value composes with its config."""
    import itertools

    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from helpers import REPO

    spec = yaml.safe_load((REPO / "sweeps" / "wandb" / f"{name}.yaml").read_text())
    assert spec["command"][1:7] == ["lm-lightning", "train", "--config-dir", "sweeps", "--config-name", name]
    assert spec["command"][-1] == "${args_no_hyphens}"
    hydra_params = OmegaConf.load(REPO / "sweeps" / f"{name}.yaml").hydra.sweeper.params
    grid = {key: p["values"] for key, p in spec["parameters"].items()}
    assert {k: [float(v) for v in values] for k, values in grid.items()} == {
        k: [float(v) for v in str(values).split(",")] for k, values in hydra_params.items()}
    with initialize_config_dir(config_dir=str(REPO / "sweeps"), version_base="1.3"):
        for values in itertools.product(*grid.values()):
            overrides = [f"{k}={v}" for k, v in zip(grid, values)]
            cfg = compose(config_name=name, overrides=[*overrides, f"hydra.searchpath=[file://{REPO / 'lm_lightning' / 'conf'}]"])
            for k, v in zip(grid, values):
                assert float(OmegaConf.select(cfg, k)) == float(v)
