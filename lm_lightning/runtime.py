"""What every command shares: the config folder, the error contract, loggers, callbacks, checkpoints."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lm_lightning.errors import IncompatiblePair, UserError
from lm_lightning.tracking.sweep import JobFailure, JobSkipped

log = logging.getLogger("lm_lightning")


def _conf_dir() -> str:
    """``conf/`` at the repository root (editable install, source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"lm-lightning's conf/ folder was not found next to {here}: install with `pip install -e .`")


CONF_DIR = _conf_dir()
REPO_DIR = str(Path(CONF_DIR).parent)


def _required_value_not_given() -> Any:
    raise UserError("a value the experiment marks ${required:} was not given: set it on the command line")


def _register_resolvers() -> None:
    """``${repo_dir:}``; ``${required:}``, an experiment's value the user must give; and
    ``${run_name:<experiment>}`` / ``${sweep_group:<experiment>}`` for tracker configs."""
    if not OmegaConf.has_resolver("repo_dir"):
        OmegaConf.register_new_resolver("repo_dir", lambda: REPO_DIR)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required_value_not_given)
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", lambda experiment: run_identity(experiment)[0])
        OmegaConf.register_new_resolver("sweep_group", lambda experiment: run_identity(experiment)[1])


_register_resolvers()


def hydra_command(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """Turns ``fn(cfg)`` into a Hydra app over ``conf/<config_name>.yaml``.

    A :class:`UserError` ends the command with one line ``error: <message>`` and exit status 2,
    not a traceback; in a multirun the failing job is reported and the sweep goes on.
    """

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(fn)
        def task(cfg: DictConfig) -> Any:
            multirun = HydraConfig.get().mode == RunMode.MULTIRUN
            try:
                return fn(cfg)
            except Exception as err:
                if user_error := _user_error(err):
                    print(f"error: {user_error}", file=sys.stderr, flush=True)
                    if multirun:
                        # a grid over families x objectives skips the pairs that cannot train together
                        kind = JobSkipped if isinstance(user_error, IncompatiblePair) else JobFailure
                        return kind(str(user_error))
                    sys.exit(2)
                if not multirun:
                    raise
                # a crashed job is logged in full and reported; the sweep goes on with the next job
                log.exception("job failed")
                return JobFailure(f"{type(err).__name__}: {err}")

        app = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)(task)

        @functools.wraps(fn)
        def entry() -> Any:
            problem = check_overrides(config_name, sys.argv[1:])
            if problem:
                print(f"error: {problem}", file=sys.stderr, flush=True)
                sys.exit(2)
            return app()

        return entry

    return decorate


def _user_error(err: BaseException) -> UserError | None:
    """The UserError behind ``err``, also when Hydra's instantiate wrapped it."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


def check_overrides(config_name: str, args: list[str]) -> str | None:
    """Composes the config once with the command-line overrides; returns a one-line problem or None.

    Hydra reports a bad override over several lines; users get one line that names the key and
    the valid choices. Sweeps (``a=1,2``) are checked with their first value.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    overrides = []
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.startswith("hydra"):
            continue  # flags (-m, --cfg job) and Hydra's own settings are Hydra's to check
        try:
            override = parser.parse_override(arg)
        except OverrideParseException as err:
            return f"cannot parse override {arg!r}: {str(err).splitlines()[0]}"
        if override.is_sweep_override():
            arg = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
        overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException) as err:
        return _one_line(err, config_name)
    if config_name == "train":
        from lm_lightning.config_checks import check_train_config

        try:
            check_train_config(cfg)
        except UserError as err:
            return str(err)
    printing_only = any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in args)  # --cfg, --help
    missing = [key for key in _missing_values(cfg) if not key.startswith("hydra.")]
    if missing and not printing_only:
        return _required(missing, config_name)
    return None


REQUIRED = "${required:}"  # an experiment's required value: ``???`` in an overlay would keep the default


def _missing_values(cfg: Any, prefix: str = "") -> list[str]:
    """Keys the user must still give: ``???`` after composition, or an experiment's ``${required:}``.
    Read from the unresolved config (some interpolations need a running Hydra app)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=False)
    found = []
    for key, value in cfg.items():
        if value in ("???", REQUIRED):
            found.append(f"{prefix}{key}")
        elif isinstance(value, dict):
            found += _missing_values(value, f"{prefix}{key}.")
    return found


def _required(keys: list[str], config_name: str) -> str:
    """One line naming the values the user must give, each described by its config comment:
    ``ckpt_path is required: lm-lightning evaluate ckpt_path=<a .ckpt written by lm-lightning train>``."""
    import re

    comments = {}
    for path in [Path(CONF_DIR) / f"{config_name}.yaml", *sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))]:
        for line in path.read_text().splitlines():
            if found := re.match(r"(\w+):\s*(?:\?\?\?|\$\{required:\})\s*#\s*(?:required:\s*)?(.*)", line):
                comments.setdefault(found.group(1), found.group(2).strip())
    names = " and ".join(keys)
    command = config_name.replace("_", " ")  # scaling_fit -> scaling fit
    usage = " ".join(f"{key}=<{comments.get(key, 'value')}>" for key in keys)  # comments of top-level keys only
    return f"{names} {'is' if len(keys) == 1 else 'are'} required: lm-lightning {command} {usage}"


def _one_line(err: Exception, config_name: str) -> str:
    import difflib
    import re

    text = f"{err} {err.__cause__ or ''}"
    if missing_key := re.search(r"full_key: ([\w.]+)", text):
        full_key = missing_key.group(1)
        parent, _, leaf = full_key.rpartition(".")
        hint = ""
        with contextlib.suppress(Exception):
            from hydra import compose, initialize_config_dir

            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                base = compose(config_name=config_name)
            siblings = list(OmegaConf.select(base, parent).keys()) if parent else list(base.keys())
            close = difflib.get_close_matches(leaf, [str(k) for k in siblings], n=1)
            hint = f"; did you mean {parent + '.' if parent else ''}{close[0]}?" if close else ""
        return f"unknown config key {full_key!r} (not in conf/{config_name}.yaml or its groups{hint} A new key needs a leading +)"
    if group := re.search(r"Could not find '([\w/]+)'", text):
        listed = re.search(r"Available options in '[\w/]+':\n(.*?)(\nConfig search path|$)", str(err), flags=re.S)
        options = listed.group(1).split() if listed else []
        name = group.group(1)
        choices = f": choose one of {', '.join(options)}" if options else ""
        return f"no config {name!r} in conf/{name.rpartition('/')[0]}/{choices}"
    return " ".join(str(err).split())


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiates every entry with a ``_target_`` in a group such as ``logger`` or ``callbacks``; null entries are off."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if isinstance(node, DictConfig) and "_target_" in node]


def run_identity(experiment: str) -> tuple[str, str | None]:
    """(run name, sweep group) for trackers: named from the job's overrides, grouped by the multirun sweep."""
    hc = HydraConfig.get()
    overrides = hc.job.override_dirname
    name = f"{experiment}-{overrides}" if overrides else experiment
    if hc.mode != RunMode.MULTIRUN:
        return name, None
    return name, f"{experiment}-{Path(hc.sweep.dir).name}"


def plain(cfg: Any) -> Any:
    """DictConfig → plain containers, resolved."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def resolve_checkpoint(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """``last`` → ``<run>/checkpoints/last.ckpt`` of this run folder (error if missing); a path must exist."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        path = checkpoint_dir / "last.ckpt"
        if not path.exists():  # a file, or a folder of shards (strategy=fsdp2)
            raise UserError(
                f"ckpt_path=last but {path} does not exist: resume inside the earlier run's folder with "
                "hydra.run.dir=<that folder> ckpt_path=last, or pass ckpt_path=<file.ckpt>"
            )
        return str(path)
    if not Path(ckpt_path).exists():
        raise UserError(f"checkpoint not found: {ckpt_path} (pass ckpt_path=<an existing .ckpt file>)")
    return ckpt_path


def load_trained(ckpt_path: str, device: str = "cpu"):
    """A trained LanguageModelTask and its tokenizer, from one checkpoint file."""
    from lm_lightning.data.tokenizer import Tokenizer
    from lm_lightning.tasks.language_model import LanguageModelTask
    from lm_lightning.training.checkpoint_io import verify_checkpoint

    path = Path(ckpt_path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path} (pass ckpt_path=<an existing .ckpt file>)")
    if path.is_file() and path.suffix == ".pt":  # an int8 model written by lm-lightning quantize
        from lm_lightning.compression.quantize import load_int8

        return load_int8(path)
    if path.is_file():
        verify_checkpoint(path)  # a checkpoint with a sidecar must match it, as when training resumes
    try:
        from lm_lightning.parallel.checkpoint import as_file  # a sharded (fsdp2) folder is gathered in memory

        task = LanguageModelTask.load_from_checkpoint(as_file(path), map_location=device, weights_only=False)
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch.load
        raise UserError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); pass another ckpt_path") from err
    if task.tokenizer_model is None:
        raise UserError(f"checkpoint {path} carries no tokenizer: it was not written by lm-lightning train")
    with tempfile.NamedTemporaryFile(suffix=".model") as f:
        f.write(task.tokenizer_model)
        f.flush()
        tokenizer = Tokenizer.load(f.name)  # read into memory; the file can go
    task.eval()
    return task, tokenizer


def set_threads(num_threads: int | None) -> None:
    if num_threads:
        torch.set_num_threads(num_threads)
