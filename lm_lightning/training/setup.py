"""What ``lm-lightning train`` settles before it builds the model: the weights a continued run starts
from, the shape and length the ``scaling`` options choose, and the objective's tokenizer-dependent settings."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from lm_lightning.config.app import plain
from lm_lightning.errors import UserError
from lm_lightning.scaling.budget import describe_plan, plan_budget, shape_for_depth
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


def apply_scaling(cfg: DictConfig, model_cfg: dict[str, Any], tokens_per_step: int) -> dict[str, Any]:
    """The ``scaling`` options: the width from the depth by the aspect ratio, and the steps (and, with
    tokens per parameter, the depth) from a compute budget. Updates ``cfg`` so the run record and
    the tracker show the shape and length actually trained."""
    scaling = cfg.get("scaling") or {}
    if scaling.get("compute_budget"):
        plan = plan_budget(model_cfg, float(scaling.compute_budget), tokens_per_step, scaling.aspect_ratio,
                           scaling.head_size, scaling.tokens_per_param)
        shape = {k: getattr(plan, k) for k in ("n_layer", "n_embd", "n_head") if k in model_cfg}
        cfg.trainer.max_steps = plan.steps
        log.info("compute budget: %s", describe_plan(plan, float(scaling.compute_budget)))
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
