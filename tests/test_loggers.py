"""TensorBoard and MLflow as places to compare runs (``lm_lightning/tracking/loggers.py``, the job runner's finish).

One 2-job lr multirun with ``logger=[tensorboard,mlflow]`` (Hydra's list of a group's options: both loggers and
the CSV log), in this process. TensorBoard's own HParams backend (what its HParams tab shows) is asked for the
session groups: one per job, its dotted hyper-parameters beside its final validation loss. MLflow's client reads
the file store: both runs in the experiment named ``experiment_name``, named from their overrides, tagged with the
sweep, with dotted params and the final metrics. Each figure is checked against the job's own ``run.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import run_in_process

from lm_lightning.tracking.loggers import SWEEP_TAG, flat_params, mlflow_logger

TINY = ["experiment=tiny", "scheduler.warmup_steps=1", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "sample.max_new_tokens=0", "num_threads=1"]
LRS = (0.001, 0.003)


class Sweep(NamedTuple):
    folder: Path  # the sweep folder (hydra.sweep.dir)
    store: Path  # the MLflow file store (<paths.log_dir>/mlruns)
    records: dict[float, dict]  # run.json of each job, by its lr
    stdout: str


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, corpus_cache) -> Sweep:
    root = tmp_path_factory.mktemp("loggers")
    proc = run_in_process("train", "-m", *TINY, "logger=[tensorboard,mlflow]", f"optimizer.lr={LRS[0]},{LRS[1]}",
                          f"paths.log_dir={root / 'outputs'}", f"hydra.sweep.dir={root / 'sweep'}", cwd=root,
                          cache=corpus_cache)
    records = [json.loads(path.read_text()) for path in (root / "sweep").glob("*/run.json")]
    return Sweep(root / "sweep", root / "outputs" / "mlruns",
                 {record["config"]["optimizer"]["lr"]: record for record in records}, proc.stdout)


def test_tensorboard_hparams_tab_shows_each_jobs_hyperparameters_and_final_validation_loss(sweep):
    from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.context import RequestContext
    from tensorboard.plugins.base_plugin import TBContext
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep.folder))  # `tensorboard --logdir <sweep>`, as the banner says
    mux.Reload()
    context = backend_context.Context(TBContext(logdir=str(sweep.folder), multiplexer=mux,
                                                data_provider=MultiplexerDataProvider(mux, str(sweep.folder))))
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=10, allowed_statuses=[  # the tab's default
        api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    groups = list_session_groups.Handler(RequestContext(), context, "", request).run().session_groups

    assert len(groups) == 2
    for group in groups:
        lr = group.hparams["optimizer.lr"].number_value
        record = sweep.records[lr]
        assert group.name.startswith(Path(record["output_dir"]).name + "/tensorboard/")
        assert group.hparams["model.n_layer"].number_value == 2
        assert group.hparams["parameters.total"].number_value == record["parameters"]["total"]
        metrics = {value.name.tag: value for value in group.metric_values}
        assert {"final/val/loss", "final/val/perplexity", "final/val/bpb"} <= set(metrics)
        assert metrics["final/val/loss"].value == pytest.approx(record["final"]["val/loss"], rel=1e-6)
        assert metrics["final/val/loss"].training_step == record["steps"] == 4
    losses = {group.hparams["optimizer.lr"].number_value: group.metric_values[0].value for group in groups}
    assert set(losses) == set(LRS) and losses[LRS[0]] != losses[LRS[1]]
    assert f"TensorBoard:     tensorboard --logdir {sweep.folder}" in sweep.stdout


def test_mlflow_store_holds_both_runs_named_from_overrides_and_tagged_with_the_sweep(sweep, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 opens its file store only when asked
    from mlflow import MlflowClient

    client = MlflowClient(f"file:{sweep.store}")
    experiment = client.get_experiment_by_name("tiny")  # experiment_name, not one fixed experiment
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for run in runs:
        lr = float(run.data.params["optimizer.lr"])
        record = sweep.records[lr]
        assert run.info.run_name == record["run_name"]
        assert record["run_name"].startswith("tiny-") and f"optimizer.lr={lr}," in record["run_name"]
        assert run.info.status == "FINISHED"
        assert run.data.tags[SWEEP_TAG] == record["group"] == "tiny-sweep"
        params = run.data.params
        assert params["model.n_layer"] == "2" and params["trainer.max_steps"] == "4"
        assert params["parameters.total"] == str(record["parameters"]["total"])
        metrics = run.data.metrics
        assert metrics["final/val/loss"] == pytest.approx(record["final"]["val/loss"], rel=1e-6)
        assert metrics["tokens_trained"] == record["tokens_trained"]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss_curves.png"]
        assert f"MLflow run:      {run.info.run_id} in experiment 'tiny'" in sweep.stdout
    assert {float(run.data.params["optimizer.lr"]) for run in runs} == set(LRS)
    assert not client.get_experiment_by_name("lm-lightning")


def test_loggers_listed_together_compose_into_one_group():
    from hydra import compose, initialize_config_dir

    from lm_lightning.config.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["logger=[wandb,tensorboard]"])
    assert sorted(cfg.logger) == ["csv", "tensorboard", "wandb"]


def test_hyperparameters_are_flattened_to_the_names_the_command_line_uses():
    hyperparameters = {"config": {"optimizer": {"lr": 0.001, "betas": [0.9, 0.95]}, "model": {"n_layer": 2},
                                  "seed": 1, "scaling": {}},
                       "parameters": {"total": 9}, "model": "info", "run_name": "tiny"}
    assert flat_params(hyperparameters) == {
        "optimizer.lr": 0.001, "optimizer.betas": [0.9, 0.95], "model.n_layer": 2, "seed": 1, "scaling": {},
        "parameters.total": 9, "job.model": "info", "run_name": "tiny"}


def test_an_mlflow_parameter_logged_again_keeps_its_first_value_instead_of_failing_the_job(tmp_path, monkeypatch):
    """Lightning logs the LightningModule's hyper-parameters after the job's; MLflow refuses to change one."""
    monkeypatch.chdir(tmp_path)
    logger = mlflow_logger("exp", "run", tracking_uri="file:mlruns", group="exp-sweep")
    logger.log_hyperparams({"lr": 0.1})
    logger.log_hyperparams({"lr": 0.2, "model": {"n_layer": 1}})
    logger.finalize("success")
    run = logger.experiment.get_run(logger.run_id)
    assert run.data.params == {"lr": "0.1", "model/n_layer": "1"}
    assert run.data.tags[SWEEP_TAG] == "exp-sweep" and run.info.run_name == "run"
    assert logger.experiment.tracking_uri == f"file:{tmp_path / 'mlruns'}"  # absolute: every job finds the same store
