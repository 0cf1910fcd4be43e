"""`scaling plan scaling.fit=...`: the depth of least loss a fitted L(N, D) predicts at a FLOP or wall-time budget,
the fit read from what `scaling fit` writes, and `train` training exactly that plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_in_process
from lm_lightning.errors import UserError
from lm_lightning.scaling.budget import model_figures, shape_for_depth
from lm_lightning.scaling.planner import load_law, plan_from_fit, predicted_loss

GPT = {"_target_": "lm_lightning.models.gpt.build_gpt", "vocab_size": 1024, "block_size": 128, "n_layer": 2,
       "n_head": 2, "n_embd": 64, "bias": False}
#: Chinchilla-like constants; with these models' N the loss is least at depth 3 for 1e13 FLOPs and 5 for 1e14
LAW = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}


def _loss_at(depth: int, budget: float, per_step: int) -> float:
    n, fpt = model_figures({**GPT, **shape_for_depth(depth, 32, 32)})
    return predicted_loss(LAW, n, max(1, round(budget / fpt / per_step)) * per_step)


@pytest.mark.parametrize("budget", [1e13, 1e14])
def test_the_plan_is_the_depth_of_least_predicted_loss_at_a_flop_budget(budget):
    plan, tried = plan_from_fit(GPT, LAW, 2048, aspect_ratio=32, head_size=32, budget=budget)
    every = {depth: _loss_at(depth, budget, 2048) for depth in range(1, 13)}
    assert plan.n_layer == min(every, key=every.get) and 1 < plan.n_layer < 12  # an interior minimum, found
    assert [c.predicted_loss for c in tried] == pytest.approx([every[d] for d in range(1, len(tried) + 1)])
    assert len(tried) == plan.n_layer + 2  # stops after the loss rose twice past the best
    assert plan.tokens == plan.steps * 2048 and abs(plan.flops / budget - 1) < 0.05


def test_a_wall_time_budget_charges_each_shape_its_own_speed():
    per_step, seconds, peak = 2048, 100.0, 1e11  # FLOP/s
    flop_plan, _ = plan_from_fit(GPT, LAW, per_step, 32, 32, budget=peak * seconds)
    # every shape sustaining the same FLOP/s: the time budget buys what the FLOP budget does
    same, _ = plan_from_fit(GPT, LAW, per_step, 32, 32, seconds=seconds,
                            tokens_per_second=lambda cfg: peak / model_figures(cfg)[1])
    assert (same.n_layer, same.steps) == (flop_plan.n_layer, flop_plan.steps)
    # small shapes that use the cores poorly (as on these CPUs) get fewer tokens: the plan goes deeper
    slow_small, tried = plan_from_fit(GPT, LAW, per_step, 32, 32, seconds=seconds,
                                      tokens_per_second=lambda cfg: peak * min(1.0, cfg["n_layer"] / 8) / model_figures(cfg)[1])
    assert slow_small.n_layer > flop_plan.n_layer
    assert all(c.tokens_per_second is not None for c in tried)


def test_the_fit_is_read_from_fits_json_or_its_folders(tmp_path):
    fit_dir = tmp_path / "ladder" / "scaling_fit"
    fit_dir.mkdir(parents=True)
    (fit_dir / "fits.json").write_text(json.dumps({"L(N,D)": {**LAW, "r2": 0.99}, "n_runs": 11}))
    for where in (fit_dir / "fits.json", fit_dir, tmp_path / "ladder"):
        assert load_law(where) == LAW


@pytest.mark.parametrize("content, says", [
    (None, "no fits.json there; run `lm-lightning scaling fit"),
    ("{not json", "is not a readable fits.json"),
    (json.dumps({"L(N)": {"alpha": 0.1}}), "holds no L(N, D) fit"),
    (json.dumps({"L(N,D)": {**LAW, "alpha": "NaN"}}), "holds no L(N, D) fit"),
])
def test_a_missing_or_fitless_fits_json_is_named(tmp_path, content, says):
    path = tmp_path / "fits.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as err:
        load_law(path)
    assert says in str(err.value) and str(path) in str(err.value)


@pytest.fixture
def fits_json(tmp_path):
    path = tmp_path / "fits.json"
    path.write_text(json.dumps({"L(N,D)": LAW}))
    return path


def test_scaling_plan_prints_every_depth_tried_and_the_plan(tmp_path, corpus_cache, fits_json):
    proc = run_in_process("scaling", "plan", f"scaling.fit={fits_json}", "scaling.compute_budget=1e13",
                          "scaling.aspect_ratio=32", "vocab_size=1024", "data.batch_size=16", "model.block_size=128",
                          cwd=tmp_path, cache=corpus_cache)
    plan, _ = plan_from_fit({**GPT, "n_layer": 6}, LAW, 16 * 128, 32, 32, budget=1e13)
    out = proc.stdout
    assert "predicted loss" in out and f"plan: n_layer {plan.n_layer}, n_embd {plan.n_embd}" in out
    assert f"{plan.n_layer:>7} {plan.n_embd:>6} {plan.non_embedding:>12,}" in out and "<- plan" in out
    assert f"trainer.max_steps={plan.steps}" in out


def test_scaling_plan_at_a_time_budget_measures_each_depth(tmp_path, corpus_cache, fits_json):
    proc = run_in_process("scaling", "plan", "experiment=tiny", f"scaling.fit={fits_json}", "scaling.time_budget=30",
                          "scaling.aspect_ratio=16", "scaling.head_size=16", "scaling.measure_steps=1",
                          "vocab_size=64", cwd=tmp_path, cache=corpus_cache)
    out = proc.stdout
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert rows and all(float(row[4].replace(",", "")) > 0 for row in rows)  # tokens/s, measured per depth
    assert "tokens/s" in out and "s of training at each depth's measured tokens/s" in out
    assert "plan: n_layer" in out and "FLOPs in 30 s of training" in out


def test_train_with_a_fit_trains_the_planned_depth(tmp_path, corpus_cache):
    fits = tmp_path / "fits.json"  # larger A: the tiny experiment's best depth at 3e9 FLOPs is 3, not its own 2
    fits.write_text(json.dumps({"L(N,D)": {**LAW, "A": 1200.0}}))
    run_dir = tmp_path / "run"
    proc = run_in_process("train", "experiment=tiny", f"scaling.fit={fits}", "scaling.compute_budget=3e9",
                          "scaling.aspect_ratio=16", "scaling.head_size=16", "scheduler.warmup_steps=1",
                          "trainer.val_check_interval=5", f"hydra.run.dir={run_dir}", cwd=tmp_path, cache=corpus_cache)
    record = json.loads((run_dir / "run.json").read_text())
    model = record["config"]["model"]
    vocab = json.loads((Path(record["corpus_dir"]) / "report.json").read_text())["tokenizer"]["vocab_size"]
    plan, _ = plan_from_fit({**model, "vocab_size": vocab},
                            {**LAW, "A": 1200.0}, 8 * 32, 16, 16, budget=3e9)
    assert "depth from the fit" in proc.stdout + proc.stderr and plan.n_layer == 3
    assert (model["n_layer"], model["n_embd"], record["steps"]) == (plan.n_layer, plan.n_embd, plan.steps)


@pytest.mark.parametrize("overrides, says", [
    (["scaling.time_budget=60"], "scaling.time_budget needs scaling.fit"),
    (["scaling.fit=FITS", "scaling.tokens_per_param=20"], "both choose the depth"),
    (["scaling.fit=FITS", "scaling.time_budget=60"], "needs one budget"),
    (["scaling.fit=FITS", "scaling.aspect_ratio=null"], "set scaling.aspect_ratio"),
])
def test_conflicting_scaling_options_are_named(tmp_path, corpus_cache, fits_json, overrides, says):
    overrides = [o.replace("FITS", str(fits_json)) for o in overrides]
    proc = run_in_process("scaling", "plan", "scaling.compute_budget=1e13", "scaling.aspect_ratio=32", *overrides,
                          cwd=tmp_path, cache=corpus_cache, check=False)
    assert proc.returncode != 0 and says in proc.stderr and "Traceback" not in proc.stderr
