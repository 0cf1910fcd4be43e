"""TensorBoard and MLflow as places to compare runs, beside W&B.

Both get the job's hyper-parameters with dotted names (``optimizer.lr``, as the command line names them) and,
at the end of the job, its final metrics as ``final/<metric>``: TensorBoard's HParams tab then shows one row per
job with its hyper-parameters and final validation loss; MLflow's run table the same, each run named from its
overrides in the experiment ``experiment_name`` and tagged with its multirun sweep (``sweep_group``).
"""

from __future__ import annotations

import numbers
import os
from argparse import Namespace
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

SWEEP_TAG = "sweep_group"  # the MLflow tag holding the multirun sweep a run belongs to (W&B's group)
LOCAL_SCHEMES = ("sqlite:///", "file:")  # tracking stores on this machine, never the network


def flat_params(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The job's hyper-parameters as one level of dotted names: the config's keys as the command line names them
    (``{"config": {"optimizer": {"lr": 1e-3}}}`` → ``optimizer.lr``), the command's own figures beside them
    (``parameters.total``); one whose top-level name is also a config key's goes under ``job.``."""
    config = dict(hyperparameters.get("config") or {})
    extras = {(f"job.{key}" if key in config else key): value
              for key, value in hyperparameters.items() if key != "config"}
    return _flatten({**config, **extras})


def _flatten(tree: Mapping[str, Any], prefix: str = "", separator: str = ".") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{name}{separator}", separator))
        else:
            flat[name] = value
    return flat


def local_uri(uri: str) -> str:
    """``uri`` with a relative path of a local store (``file:outputs/mlruns``, ``sqlite:///outputs/mlflow.db``)
    made absolute, its folder created; a server's URI as it is."""
    for scheme in LOCAL_SCHEMES:
        if uri.startswith(scheme):
            path = Path(uri.removeprefix(scheme).removeprefix("//")).expanduser().resolve()
            (path.parent if scheme == "sqlite:///" else path).mkdir(parents=True, exist_ok=True)
            return f"{scheme}{path}"
    return uri


class FirstValueMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, except that a parameter name logged again keeps its first value instead of
    failing the job: MLflow refuses to change a parameter, and Lightning logs the LightningModule's own
    hyper-parameters after the job's (finetune's config and its module both name ``lr``)."""

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace) -> None:
        logged = self.experiment.get_run(self.run_id).data.params
        params = _flatten(vars(params) if isinstance(params, Namespace) else params, separator="/")  # Lightning's names
        super().log_hyperparams({name: value for name, value in params.items() if name not in logged})


def mlflow_logger(experiment_name: str, run_name: str, tracking_uri: str, group: str | None = None,
                  artifact_location: str | None = None, tags: dict[str, str] | None = None,
                  **kwargs: Any) -> MLFlowLogger:
    """Lightning's MLFlowLogger for one job: run ``run_name`` in experiment ``experiment_name``, tagged
    ``sweep_group=<group>`` in a multirun. A local store's path is made absolute (a multirun's jobs and
    ``mlflow ui`` then find the same one); a new experiment's artifacts go to ``artifact_location``, else beside
    a local store (a file store keeps them in its run folders; a SQLite one in ``mlartifacts/`` beside the
    database, not in the working folder, MLflow's default); a server keeps its own."""
    tracking_uri = local_uri(tracking_uri)
    if tracking_uri.startswith("file:"):
        # MLflow 3 refuses its file store unless asked; it is the fast local store (a file append per logged
        # step, not a database commit) that every job of a multirun, even parallel ones, can write at once
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if not tracking_uri.startswith(LOCAL_SCHEMES):
        artifact_location = None
    elif artifact_location:
        artifact_location = str(Path(artifact_location).expanduser().resolve())
    elif tracking_uri.startswith("sqlite:///"):
        artifact_location = str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts")
    tags = {**(tags or {}), **({SWEEP_TAG: group} if group else {})}
    return FirstValueMLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                        tags=tags or None, artifact_location=artifact_location, **kwargs)


def params_for(logger: Logger, hyperparameters: Mapping[str, Any]) -> Mapping[str, Any]:
    """What ``logger`` gets as hyper-parameters: dotted names for TensorBoard and MLflow (HParams columns, MLflow
    params), the nested tree for the others (W&B's config, the CSV log's hparams.yaml)."""
    return flat_params(hyperparameters) if isinstance(logger, TensorBoardLogger | MLFlowLogger) else hyperparameters


def numeric_leaves(tree: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a nested summary as dotted names (``{"compute": {"C": 3e12}}`` → ``compute.C``); the rest
    (None, text) left out."""
    return {key: float(value) for key, value in _flatten(tree).items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)}


def log_final(logger: Logger, hyperparameters: Mapping[str, Any], final: Mapping[str, float],
              summary: Mapping[str, Any], step: int, images: Mapping[str, Path | None]) -> None:
    """The end of a job in TensorBoard or MLflow (other loggers: nothing). ``final`` (validation metrics of the
    final weights) as ``final/<metric>`` at ``step``: in TensorBoard also the HParams session that pairs them with
    the hyper-parameters (nothing without final metrics: HParams needs one); in MLflow with the numbers of
    ``summary`` (``tokens_trained``, ``compute.C``, ...) and the ``images`` as artifacts."""
    metrics = {f"final/{name}": float(value) for name, value in final.items()}
    if isinstance(logger, TensorBoardLogger):
        # final/ tags, not val/: a val/loss event at an earlier step than the last would make TensorBoard drop
        # the val/loss curve's later points as orphaned
        logger.log_hyperparams(flat_params(hyperparameters), metrics=metrics, step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.log_metrics({**metrics, **numeric_leaves(summary)}, step=step)
        for path in images.values():
            if path:
                logger.experiment.log_artifact(logger.run_id, str(path))


def viewer_lines(loggers: list[Logger], logdir: Path) -> list[str]:
    """Banner lines that open the job in TensorBoard (all runs under ``logdir``) and MLflow."""
    lines = []
    if any(isinstance(logger, TensorBoardLogger) for logger in loggers):
        lines.append(f"TensorBoard:     tensorboard --logdir {logdir}")
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            client = logger.experiment
            experiment = client.get_experiment(logger.experiment_id).name
            opt_in = "MLFLOW_ALLOW_FILE_STORE=true " if client.tracking_uri.startswith("file:") else ""
            lines.append(f"MLflow run:      {logger.run_id} in experiment {experiment!r}: "
                         f"{opt_in}mlflow ui --backend-store-uri {client.tracking_uri}")
    return lines
