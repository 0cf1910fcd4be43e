"""`scaling fit` over seeds and predictions: runs that differ only by seed become one point (mean, seed spread as
error bars and in the bootstrap), and `predict=[{N: .., D: ..}]` gives each law's loss with a 95% interval that
covers the law the synthetic runs were drawn from."""

import json

import numpy as np
import pytest

from lm_lightning.scaling.collect import average_seeds, collect_runs
from lm_lightning.scaling.power_law import fit_power_law

from helpers import run_in_process

LAW = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022
PNG = b"\x89PNG\r\n\x1a\n"


def law_loss(N, D):
    return LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]


def write_run(folder, N, D, loss, seed, lr=1e-3, status="finished"):
    """A run.json as lm-lightning train writes it, with what scaling fit reads."""
    folder.mkdir(parents=True)
    record = {"run_name": folder.name, "status": status, "final": {"val/loss": loss},
              "parameters": {"non_embedding": int(N), "total": int(N * 1.2)}, "tokens_trained": int(D),
              "training_flops": 6.6 * N * D, "best": {"val/loss": loss},
              # as in train's configs: data.seed follows the run's seed; the tokenizer's and dedup's seeds are fixed
              # values that happen to equal some runs' seeds, and must not tell those runs apart
              "config": {"seed": seed, "data": {"seed": seed, "cache_dir": f"/cache/{seed}", "corpus": {"dedup": {"seed": 1}}},
                         "tokenizer": {"seed": 0}, "model": {"n_layer": 1},
                         "optimizer": {"lr": lr}, "paths": {"output_dir": str(folder)}}}
    (folder / "run.json").write_text(json.dumps(record))


def ladder(root, seeds=(0, 1, 2), noise=0.004, rng_seed=0):
    """5 sizes x 4 token counts x seeds, losses (3.0..4.6) from LAW times a per-run seed noise."""
    rng = np.random.default_rng(rng_seed)
    for N in np.geomspace(1e7, 1e8, 5):
        for D in np.geomspace(1e9, 8e9, 4):
            for seed in seeds:
                loss = law_loss(N, D) * float(np.exp(rng.normal(0, noise)))
                write_run(root / f"N{int(N)}_D{int(D)}_s{seed}", N, D, loss, seed)


def test_runs_differing_only_by_seed_are_one_point_with_their_mean_and_spread(tmp_path):
    write_run(tmp_path / "a", 1e6, 1e8, 3.0, seed=0)
    write_run(tmp_path / "b", 1e6, 1e8, 3.2, seed=1)
    write_run(tmp_path / "c", 1e6, 1e8, 3.1, seed=2)
    write_run(tmp_path / "other_lr", 1e6, 1e8, 2.9, seed=0, lr=3e-3)  # another experiment at the same N, D
    write_run(tmp_path / "crashed", 1e6, 1e8, 9.9, seed=3, status="failed")
    points = average_seeds(collect_runs([tmp_path]))
    assert len(points) == 2
    seeded = next(p for p in points if len(p.seed_losses) == 3)
    assert seeded.loss == pytest.approx(3.1) and seeded.loss_std == pytest.approx(0.1)
    assert sorted(seeded.seed_losses) == [3.0, 3.1, 3.2]
    single = next(p for p in points if len(p.seed_losses) == 1)
    assert single.loss == 2.9 and single.loss_std is None


def test_seed_spread_widens_the_bootstrap_interval():
    """Means exactly on a power law: without seeds the interval has no width; with seeds spread 5% it has."""
    x = np.geomspace(1e5, 1e8, 6)
    mean = (1e13 / x) ** 0.08
    rng = np.random.default_rng(1)
    seeds = [list(m * np.exp(rng.normal(0, 0.05, 3))) for m in mean]
    seeds = [list(np.array(s) * m / np.mean(s)) for s, m in zip(seeds, mean)]  # means stay on the law
    plain = fit_power_law(x, mean, n_bootstrap=200, seed=0)
    folded = fit_power_law(x, mean, n_bootstrap=200, seed=0, seed_losses=seeds)
    assert plain.alpha == folded.alpha == pytest.approx(0.08)
    assert plain.alpha_ci[1] - plain.alpha_ci[0] < 1e-9
    assert folded.alpha_ci[1] - folded.alpha_ci[0] > 0.005
    assert folded.alpha_ci[0] < 0.08 < folded.alpha_ci[1]


def test_fit_averages_seeds_and_predicts_a_model_8x_larger_within_its_interval(tmp_path):
    runs = tmp_path / "ladder"
    ladder(runs)
    target_N, target_D = 8e8, 2e10  # 8x the largest model, 2.5x the most tokens
    truth = round(law_loss(target_N, target_D), 4)
    proc = run_in_process("scaling", "fit", f"runs=[{runs}]", "tracker=null", "n_bootstrap=200",
                          "n_bootstrap_chinchilla=40", "holdout_largest=false",
                          f"predict=[{{N: {target_N:g}, D: {target_D:g}, actual: {truth}}}, {{N: 1e9}}]",
                          cwd=tmp_path, cache=tmp_path / "cache")
    out = proc.stdout
    assert "scaling fit over 60 runs as 20 points: seeds averaged at 20" in out
    assert f"predicted at N=8e+08, D=2e+10, C=1.06e+20 (estimated); actual loss {truth:.4f}" in out
    assert "L(N,D)" in out and "vs actual, inside" in out
    fits = json.loads((runs / "scaling_fit" / "fits.json").read_text())
    assert fits["n_runs"] == 60 and fits["n_points"] == 20
    assert all(len(r["seed_losses"]) == 3 and r["loss_std"] > 0 for r in fits["runs"])
    assert fits["runs"][0]["loss"] == pytest.approx(np.mean(fits["runs"][0]["seed_losses"]))
    assert 0.005 < fits["seeds"]["seed_std_rms"] < 0.03  # 0.4% noise on losses of 3.0..4.6
    predicted = fits["predictions"][0]["laws"]["L(N,D)"]
    low, high = predicted["interval"]
    assert low < truth < high and abs(predicted["loss"] / truth - 1) < 0.015
    assert predicted["actual_in_interval"] and predicted["relative_error"] == pytest.approx(predicted["loss"] / truth - 1)
    assert predicted["run_interval"][0] < low and predicted["run_interval"][1] > high  # plus one run's seed noise
    assert set(fits["predictions"][0]["laws"]) == {"L(N)", "L(D)", "L(C)", "L(N,D)"}
    assert set(fits["predictions"][1]["laws"]) == {"L(N)"}  # only N given: only L(N) applies
    assert fits["L(N,D)"]["r2"] > 0.99
    for name in ("loss_vs_N.png", "loss_vs_D.png", "loss_vs_ND.png"):
        assert (runs / "scaling_fit" / name).read_bytes()[:8] == PNG


def test_a_predict_entry_without_N_D_or_C_is_refused(tmp_path):
    runs = tmp_path / "ladder"
    ladder(runs, seeds=(0,))
    proc = run_in_process("scaling", "fit", f"runs=[{runs}]", "tracker=null", "predict=[{M: 3}]", cwd=tmp_path,
                          cache=tmp_path / "cache", check=False)
    assert proc.returncode != 0 and "predict entry {'M': 3} must name N, D and/or C" in proc.stderr
