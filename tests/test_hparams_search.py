"""Hyper-parameter search (``conf/hparams_search/``): the Optuna sweeper drives ``lm-lightning train``, which returns
its ``optimized_metric`` as a float; the sweeper's best trial must be the best of the runs' own records."""

import json
import math
import re

import pytest
from helpers import run_in_process
from omegaconf import OmegaConf


def test_optuna_lr_search_finds_the_best_run_of_its_trials(tmp_path, corpus_cache):
    sweep = tmp_path / "search"
    proc = run_in_process("train", "-m", "hparams_search=tiny_lr_optuna", "experiment=tiny", "trainer.max_steps=6",
                          "logger=csv", "sample.max_new_tokens=0",
                          f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=corpus_cache)

    records = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/run.json"))]
    assert len(records) == 6  # n_trials, each one training job with its own run record
    lrs = [record["config"]["optimizer"]["lr"] for record in records]
    assert len(set(lrs)) == 6 and all(1e-4 <= lr <= 3e-2 for lr in lrs)  # sampled from the search's log interval
    losses = [record["final"]["val/loss"] for record in records]
    assert all(math.isfinite(loss) for loss in losses)
    best = min(range(6), key=losses.__getitem__)

    results = OmegaConf.load(sweep / "optimization_results.yaml")  # what the Optuna sweeper found
    assert results.best_params["optimizer.lr"] == lrs[best]
    assert results.best_value == losses[best]  # the float train returned is the run's final val/loss, exactly

    # the sweep summary still reads each job (its table row from run.json) and ends with the best trial
    summary = json.loads((sweep / "summary.json").read_text())
    assert [job["outcome"] for job in summary] == ["ok"] * 6
    assert [job["result"]["val_loss"] for job in summary] == losses
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"search best: optimizer.lr={lrs[best]}  val/loss {losses[best]:.4f}"), last


@pytest.mark.bad_input
def test_an_unknown_optimized_metric_is_named(tmp_path, corpus_cache):
    proc = run_in_process("train", "experiment=tiny", "+optimized_metric=val/accuracy", "trainer.max_steps=6",
                          "logger=csv", "sample.max_new_tokens=0", cwd=tmp_path, cache=corpus_cache, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: optimized_metric=val/accuracy is not a final metric of this run; "
        "choose one of ['val/bpb', 'val/loss', 'val/perplexity']")


def test_wandb_bayes_sweep_searches_the_same_lr_range_with_a_train_command():
    """The W&B sweep needs a W&B server to run; here: its command composes with each end of its lr range, and it
    minimises the final validation loss over the Optuna search's range."""
    import yaml  # not OmegaConf: ${args_no_hyphens} is a W&B macro, not an interpolation
    from helpers import REPO
    from hydra import compose, initialize_config_dir

    from lm_lightning.config.app import CONF_DIR

    sweep = yaml.safe_load((REPO / "sweeps" / "wandb" / "tiny_lr_bayes.yaml").read_text())
    search = OmegaConf.load(REPO / "lm_lightning" / "conf" / "hparams_search" / "tiny_lr_optuna.yaml")
    assert sweep["method"] == "bayes" and (REPO / sweep["program"]).is_file()
    assert sweep["metric"] == {"name": f"final/{search.optimized_metric}", "goal": search.hydra.sweeper.direction}
    lr = sweep["parameters"]["optimizer.lr"]
    assert lr["distribution"] == "log_uniform_values"
    low, high = re.fullmatch(r"tag\(log, interval\((.+), (.+)\)\)", search.hydra.sweeper.params["optimizer.lr"]).groups()
    assert (float(low), float(high)) == (lr["min"], lr["max"])
    command = sweep["command"]
    assert command[1:3] == ["lm-lightning", "train"] and command[-1] == "${args_no_hyphens}"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for value in (lr["min"], lr["max"]):
            cfg = compose(config_name="train", overrides=[*command[3:-1], f"optimizer.lr={value}"])
            assert cfg.optimizer.lr == value and cfg.experiment_name == "tiny"


def test_a_search_range_given_on_the_command_line_passes_the_override_check():
    from lm_lightning.config.overrides import check_overrides

    # the sweeper draws from an interval: the check before Hydra runs must not try to enumerate it
    args = ["-m", "hparams_search=tiny_lr_optuna", "experiment=tiny", "optimizer.lr=tag(log,interval(1e-3,1e-1))"]
    assert check_overrides("train", args) is None
    assert "unknown config key" in check_overrides("train", [*args, "optimizer.lrr=0.1"])  # the rest is still checked
