"""Checks of a composed training config, run before anything is built or written.

Each problem is a :class:`UserError` naming the option, so a typo costs a second, not a job.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lm_lightning.config.app import check_threads
from lm_lightning.config.numbers import Rule, check_numbers
from lm_lightning.errors import UserError
from lm_lightning.models.capabilities import (
    check_blocks_for_sharding,
    check_compatible,
    model_class,
)

MUP_REFUSED = ("SGD", "Adafactor")  # optimizers whose μP factors differ from Adam's (tasks/param_groups.py)
UNKNOWN_VOCABULARY = 2**31 - 1  # the tokenizer's vocabulary is known once the corpus is prepared: any size passes


def check_train_config(cfg: DictConfig) -> None:
    """Types and ranges of the main options; raises on the first problem found."""
    from lm_lightning.scaling.budget import check_scaling_options
    from lm_lightning.training.setup import check_init_from_fits, check_resume_fits

    model, data, trainer = cfg.model, cfg.data, cfg.trainer
    if _given(cfg, "init_from"):  # first: the run takes the checkpoint's model, not the one composed
        check_init_from_fits(cfg)
    for group in ("trainer", "optimizer", "scheduler", "data"):
        if isinstance(cfg.get(group), DictConfig) and "_target_" in cfg[group]:
            check_option_types(cfg[group], group, _target_hints(cfg[group]._target_))
    check_model_options(model)
    if model.get("parametrization") == "mup" and str(cfg.optimizer.get("_target_")).rsplit(".", 1)[-1] in MUP_REFUSED:
        raise UserError(f"model.parametrization=mup scales learning rates for Adam-type optimizers (adamw, adam, muon), "
                        f"not {cfg.optimizer._target_}: choose one of those or model.parametrization=standard")
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
    check_ranges(cfg)
    check_scaling_options(cfg.get("scaling"))
    if (cfg.get("scaling") or {}).get("fit"):
        from lm_lightning.scaling.planner import load_law

        load_law(cfg.scaling.fit)  # a missing or fit-less file is named now, before the run folder is made
    if (cfg.get("scaling") or {}).get("time_budget"):
        raise UserError("scaling.time_budget is for `lm-lightning scaling plan`, which measures each depth's speed "
                        "and prints the plan: train it with the model.n_layer and trainer.max_steps it prints, or "
                        "with scaling.compute_budget")
    check_logger_modes(cfg.get("logger"))
    if isinstance(cfg.get("sample"), DictConfig):  # the sample at the end of the run: refused now, not after training
        from lm_lightning.generation.sampling import check_sampling_options

        check_sampling_options(cfg.sample, "sample.")
    if _given(cfg, "ckpt_path"):
        check_resume_fits(cfg)
    tokenizer = cfg.tokenizer
    dtype = data.corpus.get("token_dtype", "auto")
    if dtype == "uint16" and tokenizer.get("type") != "char" and tokenizer.get("vocab_size", 0) > 65536:
        raise UserError(f"tokenizer.vocab_size={tokenizer.vocab_size} does not fit data.corpus.token_dtype=uint16 "
                        "(ids up to 65535): use token_dtype=uint32 or auto, or a smaller vocabulary")


def _count_or_fraction(value: float, least_count: int) -> bool:
    """Lightning's "how many batches": a whole count (at least ``least_count``) or a fraction of the epoch (in (0, 1]
    where the count must be at least 1, in [0, 1] where 0 is allowed)."""
    if isinstance(value, int):
        return value >= least_count
    return 0 < value <= 1 if least_count else 0 <= value <= 1


# option: (kind, test, what the value must be), as config.numbers.check_numbers reads them; None always passes
RANGES: dict[str, Rule] = {
    "trainer.limit_train_batches": (float, lambda v: _count_or_fraction(v, 0), "a whole number >= 0 or a fraction in [0, 1]"),
    "trainer.limit_val_batches": (float, lambda v: _count_or_fraction(v, 0), "a whole number >= 0 or a fraction in [0, 1]"),
    "trainer.limit_test_batches": (float, lambda v: _count_or_fraction(v, 0), "a whole number >= 0 or a fraction in [0, 1]"),
    "trainer.gradient_clip_val": (float, lambda v: v >= 0, "a number >= 0 (0 or null: no clipping)"),
    "data.val_batch_size": (int, lambda v: v >= 0, "a whole number >= 0 (0 or null: data.batch_size)"),
    "data.num_workers": (int, lambda v: v >= 0, "a whole number >= 0 (0: load in the main process)"),
    "optimizer.weight_decay": (float, lambda v: v >= 0, "a number >= 0"),
    "optimizer.eps": (float, lambda v: v > 0, "a number > 0"),
    "optimizer.momentum": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "scheduler.min_lr_ratio": (float, lambda v: 0 <= v <= 1, "a number in [0, 1] (the final lr as a share of the peak)"),
}


def check_ranges(cfg: DictConfig) -> None:
    """Numbers outside the range their option means something in (each named with what to give): Lightning, torch
    or the DataLoader would otherwise fail deep in the run, or worse, accept them (a negative clip value flips
    the gradients, a min_lr_ratio above 1 makes the decay a rise)."""
    for name, rule in RANGES.items():
        value = OmegaConf.select(cfg, name, default=None, throw_on_resolution_failure=False)
        if not isinstance(value, (DictConfig, ListConfig)):
            check_numbers({name: value}, {name: rule})
    check_threads(cfg.get("num_threads"))  # every command checks it as it sets it; train also before its run folder
    _check_val_interval(cfg)
    betas = OmegaConf.select(cfg, "optimizer.betas", default=None, throw_on_resolution_failure=False)
    if betas is not None and not (isinstance(betas, ListConfig) and len(betas) == 2 and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
        raise UserError(f"optimizer.betas={_plain(betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    for name, node in (cfg.get("callbacks") or {}).items():
        every = node.get("every_n_train_steps") if isinstance(node, DictConfig) else None
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise UserError(f"callbacks.{name}.every_n_train_steps={every!r} must be a whole number >= 0 (0: off)")


def _check_val_interval(cfg: DictConfig) -> None:
    """``trainer.val_check_interval``: steps (a whole number >= 1), a fraction of an epoch in (0, 1] where
    validation counts epochs (``check_val_every_n_epoch`` set), or Lightning's time-based durations (text, a dict)."""
    value = OmegaConf.select(cfg, "trainer.val_check_interval", default=None, throw_on_resolution_failure=False)
    if value is None or isinstance(value, (str, DictConfig)):
        return
    by_epoch = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch", default=None, throw_on_resolution_failure=False)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _count_or_fraction(value, 1):
        raise UserError(f"trainer.val_check_interval={value!r} is out of range: it must be a whole number of steps "
                        ">= 1 (or a fraction of an epoch in (0, 1] with trainer.check_val_every_n_epoch set)")
    if isinstance(value, float) and by_epoch is None:
        raise UserError(f"trainer.val_check_interval={value} is a fraction of an epoch, but validation here counts "
                        "steps across epochs (trainer.check_val_every_n_epoch=null): give a whole number of steps, "
                        "or set trainer.check_val_every_n_epoch=1")


def _plain(value: object) -> object:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def check_logger_modes(loggers: DictConfig | None) -> None:
    """A W&B logger's mode is one W&B knows (and online has a key): named now, before the run folder exists."""
    from lm_lightning.tracking.wandb import check_mode

    for node in (loggers or {}).values():
        if isinstance(node, DictConfig) and str(node.get("_target_", "")).endswith("tracking.wandb.wandb_logger"):
            check_mode(node.get("mode", "auto"))


def check_model_options(model: DictConfig) -> None:
    """Builds the model's config dataclass, whose ``__post_init__`` checks its options (shape, choices, dropout)."""
    config_class = model_class(model).config_class
    options = {k: v for k, v in OmegaConf.to_container(model, resolve=True).items() if not k.startswith("_")}
    known = [field.name for field in fields(config_class)]
    if unknown := [key for key in options if key not in known]:
        raise UserError(f"model.{unknown[0]} is not an option of {config_class.__name__}: "
                        f"its options are {', '.join(known)}")
    check_option_types(model, "model", _target_hints(f"{config_class.__module__}.{config_class.__qualname__}"))
    config_class(**{"vocab_size": UNKNOWN_VOCABULARY, **options})


def check_option_types(node: DictConfig, prefix: str, hints: dict[str, object]) -> None:
    """Each option whose annotation (in ``hints``) takes numbers but not text is a number: a typo such as
    ``trainer.max_steps=abc`` is named here instead of failing as a comparison deep in the run."""
    for key in node:
        hint = hints.get(str(key))
        if hint is None or OmegaConf.is_missing(node, key):
            continue
        allowed = _scalar_types(hint)
        if str in allowed or not allowed & {int, float}:
            continue
        try:
            value = node[key]
        except OmegaConfBaseException:  # an interpolation that resolves only inside the run (the run folder)
            value = None
        if value is None or isinstance(value, (DictConfig, ListConfig)):
            continue
        wants_int = float not in allowed
        if isinstance(value, bool) and bool in allowed:  # e.g. fast_dev_run: int | bool
            continue
        if isinstance(value, bool) or not isinstance(value, int if wants_int else (int, float)):
            raise UserError(f"{prefix}.{key} must be {'an integer' if wants_int else 'a number'}, got {value!r}")


def _scalar_types(hint: object) -> set[type]:
    """The plain types an annotation accepts (``int | None`` -> {int, NoneType}); containers count as themselves."""
    args = typing.get_args(hint)
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(arg) for arg in args))
    origin = typing.get_origin(hint)
    return {origin or hint} if isinstance(origin or hint, type) else set()


def _target_hints(target: str) -> dict[str, object]:
    """The annotations of what a config node's ``_target_`` builds ({} when it cannot be imported or read)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        return typing.get_type_hints(obj.__init__ if isinstance(obj, type) else obj)
    except (ImportError, AttributeError, NameError, TypeError):  # no annotations to read: building it reports the rest
        return {}


def _given(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` has a value; a value still to be given (``???``, ``${required:}``) is named by
    :func:`~lm_lightning.config.overrides.missing_values_problem`, not here."""
    try:
        return bool(cfg.get(key))
    except OmegaConfBaseException:
        return False


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
        if problem is None:
            problem = _lock_existing_run_folder(config)
        if problem:
            print(f"error: {problem}", file=sys.stderr, flush=True)
            sys.exit(2)


def _lock_existing_run_folder(config: DictConfig) -> str | None:
    """Takes the lock of a run folder that exists already (a resume, or a second run into a folder in use) before
    Hydra writes its ``.hydra/config.yaml`` there; the job keeps the lock (:mod:`lm_lightning.training.run_lock`).
    A new folder is locked by the job itself: nothing in it to protect before then."""
    from pathlib import Path

    from lm_lightning.tracking.sweep import is_stamped
    from lm_lightning.training import run_lock

    try:
        folder = OmegaConf.select(config, "hydra.run.dir")
    except OmegaConfBaseException:
        return None
    if is_stamped(config, "run"):
        return None  # a timestamped folder another run holds is not this one's: SweepSummary moves it aside
    if not folder or not Path(folder).is_dir():
        return None
    try:
        run_lock.acquire(folder, for_job=True)
    except UserError as err:
        return str(err)
    return None
