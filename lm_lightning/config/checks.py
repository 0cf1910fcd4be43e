"""Checks of a composed training config, run before anything is built or written.

Each problem is a :class:`UserError` naming the option, so a typo costs a second, not a job.
"""

from __future__ import annotations

from dataclasses import fields

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lm_lightning.errors import UserError
from lm_lightning.models.capabilities import check_blocks_for_sharding, check_compatible, model_class

UNKNOWN_VOCABULARY = 2**31 - 1  # the tokenizer's vocabulary is known once the corpus is prepared: any size passes


def check_train_config(cfg: DictConfig) -> None:
    """Types and ranges of the main options; raises on the first problem found."""
    model, data, trainer = cfg.model, cfg.data, cfg.trainer
    check_model_options(model)
    check_compatible(model, cfg.objective)
    if cfg.strategy.get("parallelize"):
        check_blocks_for_sharding(model)
    for key in ("batch_size",):
        _positive_int(data, f"data.{key}")
    _positive_int(trainer, "trainer.accumulate_grad_batches")
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


def check_model_options(model: DictConfig) -> None:
    """Builds the model's config dataclass, whose ``__post_init__`` checks its options (shape, choices, dropout)."""
    config_class = model_class(model).config_class
    options = {k: v for k, v in OmegaConf.to_container(model, resolve=True).items() if not k.startswith("_")}
    known = [field.name for field in fields(config_class)]
    if unknown := [key for key in options if key not in known]:
        raise UserError(f"model.{unknown[0]} is not an option of {config_class.__name__}: "
                        f"its options are {', '.join(known)}")
    config_class(**{"vocab_size": UNKNOWN_VOCABULARY, **options})


def _positive_int(node: DictConfig, name: str) -> None:
    value = node[name.rsplit(".", 1)[1]]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name}={value!r} must be a positive integer")


class RefuseBeforeRunning(Callback):
    """Hydra callback (``hydra.callbacks`` of conf/train.yaml): the composed config of a single run is checked
    before Hydra makes its run folder, so a refused run writes nothing. Hydra turns a callback's exception into a
    warning, so a problem ends the command here, as the command's own error contract does: one ``error:`` line,
    exit status 2. (A multirun's jobs are checked each in turn by the command itself.)"""

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: object) -> None:
        import sys

        from lm_lightning.config.overrides import missing_values_problem

        problem = missing_values_problem(config, config_name or "train")
        if problem is None and config_name == "train":
            try:
                check_train_config(config)
            except UserError as err:
                problem = str(err)
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)
