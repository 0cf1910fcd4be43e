"""Checks of a composed training config, run before anything is built or written.

Each problem is a :class:`UserError` naming the option, so a typo costs a second, not a job.
"""

from __future__ import annotations

from omegaconf import DictConfig

from lm_lightning.models.capabilities import check_compatible
from lm_lightning.errors import UserError
from lm_lightning.models.gpt import POSITIONS
from lm_lightning.models.layers import ACTIVATIONS, NORM_POSITIONS, NORMS

TRANSFORMERS = ("gpt", "prefix_lm", "bert", "t5", "bart")
CHOICES = {"norm": NORMS, "norm_position": NORM_POSITIONS, "activation": ACTIVATIONS, "position": POSITIONS}


def check_train_config(cfg: DictConfig) -> None:
    """Types and ranges of the main options; raises on the first problem found."""
    model, data, trainer = cfg.model, cfg.data, cfg.trainer
    check_compatible(model, cfg.objective)
    for key in ("block_size", "n_layer", "n_head", "n_embd"):
        if key in model:
            _positive_int(model, f"model.{key}")
    for key in ("batch_size",):
        _positive_int(data, f"data.{key}")
    _positive_int(trainer, "trainer.accumulate_grad_batches")
    if "n_head" in model and model.n_embd % model.n_head:
        raise UserError(f"model.n_head={model.n_head} does not divide model.n_embd={model.n_embd}: "
                        "choose a head count that divides the width")
    for key, choices in CHOICES.items():  # transformer options (recurrent and FFN models check their own)
        if key in model and model[key] not in choices and model.get("family") in TRANSFORMERS:
            raise UserError(f"model.{key}={model[key]!r} is not known: choose one of {', '.join(choices)}")
    if not 0.0 <= float(model.get("dropout", 0.0)) < 1.0:
        raise UserError(f"model.dropout={model.dropout} must be in [0, 1)")
    if data.block_size > model.block_size:
        raise UserError(f"data.block_size={data.block_size} is above model.block_size={model.block_size}, "
                        "the positional table: windows must fit the context")
    if trainer.max_steps is None or (trainer.max_steps <= 0 and trainer.max_steps != -1):
        raise UserError(f"trainer.max_steps={trainer.max_steps} must be positive (or -1 with max_epochs)")
    if float(cfg.optimizer.get("lr", 1.0)) <= 0:
        raise UserError(f"optimizer.lr={cfg.optimizer.lr} must be positive")
    scheduler = cfg.get("scheduler")
    if scheduler and "total_steps" in scheduler and scheduler.total_steps <= scheduler.get("warmup_steps", 0):
        raise UserError(f"scheduler.total_steps={scheduler.total_steps} must exceed "
                        f"scheduler.warmup_steps={scheduler.warmup_steps} (shorten the warmup for short runs)")
    tokenizer = cfg.tokenizer
    dtype = data.corpus.get("token_dtype", "auto")
    if dtype == "uint16" and tokenizer.get("type") != "char" and tokenizer.get("vocab_size", 0) > 65536:
        raise UserError(f"tokenizer.vocab_size={tokenizer.vocab_size} does not fit data.corpus.token_dtype=uint16 "
                        "(ids up to 65535): use token_dtype=uint32 or auto, or a smaller vocabulary")


def _positive_int(node: DictConfig, name: str) -> None:
    value = node[name.rsplit(".", 1)[1]]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive integer")
