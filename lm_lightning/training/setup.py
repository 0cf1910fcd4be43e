"""What ``lm-lightning train`` settles before it builds the model: the weights a continued run starts
from, the shape and length the ``scaling`` options choose, and the objective's tokenizer-dependent settings."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lm_lightning.config.app import plain
from lm_lightning.errors import UserError
from lm_lightning.scaling.budget import describe_plan, plan_budget, shape_for_depth
from lm_lightning.scaling.planner import load_law, plan_from_fit
from lm_lightning.training.loading import load_trained

log = logging.getLogger("lm_lightning.cli.train")


class Start:
    """Continued pretraining: the weights a run starts from (``init_from``)."""

    def __init__(self, path: str, state: dict[str, torch.Tensor]) -> None:
        self.path, self.state = path, state

    def load_into(self, model: torch.nn.Module) -> None:
        try:
            model.load_state_dict(self.state)
        except RuntimeError as err:
            raise UserError(f"init_from={self.path}: its weights do not fit the model this run builds "
                            f"({str(err).splitlines()[0]}); keep the checkpoint's objective family") from err
        log.info("initialised the model from %s", self.path)


def start_from_checkpoint(cfg: DictConfig) -> Start:
    """Continued pretraining: the run takes ``init_from``'s architecture (the ``model`` group is
    replaced by it) and tokenizer (the new corpus is tokenized with it), and starts from its weights;
    the optimizer, schedule and step count start afresh."""
    pretrained, _ = load_trained(cfg.init_from)
    tokenizers = Path(cfg.paths.cache_dir).expanduser() / "tokenizers"
    tokenizers.mkdir(parents=True, exist_ok=True)
    model_bytes = pretrained.tokenizer_model
    model_file = tokenizers / f"{hashlib.sha256(model_bytes).hexdigest()[:16]}.model"
    if not model_file.is_file():
        model_file.write_bytes(model_bytes)
    with open_dict(cfg):
        cfg.tokenizer = {"model_file": str(model_file)}
        cfg.model = {k: v for k, v in plain(pretrained.hparams.model).items() if k != "vocab_size"}
    return Start(str(cfg.init_from), pretrained.model.state_dict())


def checkpoint_hparams(path: str | Path, option: str) -> dict[str, Any]:
    """The hyper-parameters of a checkpoint written by ``lm-lightning train``, verified and read with
    ``weights_only=True`` (no code in the file runs); ``option`` names where the path was given. A damaged,
    foreign or unreadable file is refused in one line. The config checks run before the run folder is made and
    again inside the command: the same unchanged file is verified and read once per process."""
    stat = Path(path).stat()
    return _checkpoint_hparams(str(path), Path(path).resolve(), stat.st_mtime_ns, stat.st_size, option)


@functools.lru_cache(maxsize=8)
def _checkpoint_hparams(path: str, resolved: Path, mtime_ns: int, size: int, option: str) -> dict[str, Any]:
    from lm_lightning.training.checkpoint_io import load_checkpoint_file

    try:  # verified first (sidecar or the SHA-256 sealed inside), then read with weights_only=True; the tensors
        # are memory-mapped, not read: only the hyper-parameters are wanted
        checkpoint = load_checkpoint_file(path, f"{option}={path}", mmap=True)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - not a zip or pickle, truncated: torch fails in many ways
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{option}={path} is not a checkpoint this platform can read safely "
                        f"({type(err).__name__}: {first}); pass a .ckpt written by lm-lightning train") from None
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "state_dict" not in checkpoint or not isinstance(hparams.get("model"), dict):
        raise UserError(f"{option}={path} is not a Lightning checkpoint written by lm-lightning train "
                        "(no state_dict or model hyper-parameters); pass a .ckpt from a run's checkpoints/ folder")
    return hparams


def model_differences(saved: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """``key: checkpoint value != run value`` for each model option that differs (the family first; the vocabulary
    size, known only once the corpus is read, is left out)."""
    ignored = {"vocab_size"}
    if saved.get("family") != run.get("family"):
        return [f"family: {saved.get('family')} != {run.get('family')}"]
    keys = [k for k in dict.fromkeys([*saved, *run]) if k not in ignored]
    return [f"{k}: {saved.get(k)!r} != {run.get(k)!r}" for k in keys if saved.get(k) != run.get(k)]


def check_resume_fits(cfg: DictConfig) -> None:
    """``ckpt_path`` (a file) holds the model this run builds: the options that differ are named in one line,
    before Lightning loads the weights into a model of another shape (a size-mismatch traceback). Skipped when
    the ``scaling`` options choose the shape (known only later) and for a folder of shards (checked when loaded)."""
    ckpt_path = cfg.get("ckpt_path")
    if not ckpt_path:
        return
    path = Path(str(ckpt_path)).expanduser()
    if str(ckpt_path) == "last":
        path = _run_folder(cfg) / "checkpoints" / "last.ckpt" if _run_folder(cfg) else Path("")
    scaling = cfg.get("scaling") or {}
    if not path.is_file() or scaling.get("compute_budget") or scaling.get("aspect_ratio"):
        return
    saved = checkpoint_hparams(path, "ckpt_path")["model"]
    run = {k: v for k, v in plain(cfg.model).items() if not str(k).startswith("_") or k == "_target_"}
    if differences := model_differences(saved, run):
        raise UserError(f"ckpt_path={ckpt_path} holds another model than this run builds ({'; '.join(differences)} "
                        "[checkpoint != run]): resume with the checkpoint's model options, or start from its "
                        "weights with init_from= instead")


def check_init_from_fits(cfg: DictConfig) -> None:
    """``init_from`` (a file) is a checkpoint of lm-lightning train whose model family this run's objective can
    train (the run takes its architecture): refused in one line before the run folder is made or the corpus read."""
    from lm_lightning.models.capabilities import check_compatible

    path = Path(str(cfg.init_from)).expanduser()
    if not path.is_file():
        return  # a missing file or a folder of shards: load_trained says so
    saved = checkpoint_hparams(path, "init_from")["model"]
    try:
        check_compatible(saved, cfg.objective)
    except UserError as err:
        raise UserError(f"{err} (init_from={cfg.init_from} holds a {saved.get('family')} model, "
                        "which the run continues)") from None


def _run_folder(cfg: DictConfig) -> Path | None:
    """The run folder: ``hydra.run.dir`` of a config that still holds Hydra's node (the callback before the run:
    Hydra has not made the folder, and a HydraConfig set by an earlier run in this process is not this run's),
    else Hydra's output folder of the running job."""
    from hydra.core.hydra_config import HydraConfig

    run_dir = OmegaConf.select(cfg, "hydra.run.dir", default=None, throw_on_resolution_failure=False)
    if run_dir:
        return Path(run_dir)
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:  # a config composed by hand
        return None


def apply_scaling(cfg: DictConfig, model_cfg: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """The ``scaling`` options: the width from the depth by the aspect ratio, and the steps (and, with
    tokens per parameter, the depth) from a compute budget. Updates ``cfg`` so the run record and
    the tracker show the shape and length actually trained."""
    scaling = cfg.get("scaling") or {}
    if scaling.get("compute_budget"):
        budget = float(scaling.compute_budget)
        if scaling.get("fit"):
            plan, _ = plan_from_fit(model_cfg, load_law(scaling.fit), tokens_per_step, scaling.aspect_ratio,
                                    scaling.head_size, budget=budget)
        else:
            plan = plan_budget(model_cfg, budget, tokens_per_step, scaling.aspect_ratio, scaling.head_size,
                               scaling.tokens_per_param)
        shape = {k: getattr(plan, k) for k in ("n_layer", "n_embd", "n_head") if k in model_cfg}
        cfg.trainer.max_steps = plan.steps
        source = f", depth from the fit {scaling.fit}" if scaling.get("fit") else ""
        log.info("compute budget%s: %s", source, describe_plan(plan, budget))
    elif scaling.get("aspect_ratio"):
        shape = shape_for_depth(int(model_cfg["n_layer"]), scaling.aspect_ratio, scaling.head_size)
    else:
        return model_cfg
    cfg.model.update(shape)
    return {**model_cfg, **shape}


def objective_config(objective: DictConfig, tokenizer) -> dict[str, Any]:
    """The objective's config with what only the tokenizer knows: its vocabulary size and, for
    BART's sentence permutation when not given, the ids of pieces that end a sentence."""
    out = {**plain(objective), "vocab_size": tokenizer.vocab_size}
    if "sentence_end_ids" in out and out["sentence_end_ids"] is None:
        out["sentence_end_ids"] = tokenizer.ids_ending_with((".", "!", "?"))
    return out
