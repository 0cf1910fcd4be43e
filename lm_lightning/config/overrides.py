"""Command-line overrides checked before Hydra runs: one line naming the key, the choices or the value to give."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lm_lightning.config.app import CONF_DIR
from lm_lightning.errors import UserError


COMPOSITION_ERRORS = ("ConfigCompositionException", "MissingConfigException")  # hydra.errors, named lazily


def check_overrides(config_name: str, args: list[str]) -> str | None:
    """Composes the config once with the command-line overrides; returns a one-line problem or None.

    Hydra reports a bad override over several lines; users get one line that names the key and
    the valid choices. Sweeps (``a=1,2``) are checked with their first value, except an experiment
    sweep: each experiment must be one of this command's. The console command does the same checks
    around Hydra's own composition instead (:func:`check_before_composing`, :func:`composition_problem`,
    :func:`missing_values_problem`): one composition per command, not two.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    problem, overrides = _parse(config_name, args)
    if problem:
        return problem
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except (ConfigCompositionException, MissingConfigException) as err:
        return _one_line(err, config_name)
    if config_name == "train":
        from lm_lightning.config.checks import check_train_config

        try:
            check_train_config(cfg)
        except UserError as err:
            return str(err)
    printing_only = any(arg.startswith("-") and arg not in ("-m", "--multirun") for arg in args)  # --cfg, --help
    return None if printing_only else missing_values_problem(cfg, config_name)


def check_before_composing(config_name: str, args: list[str]) -> str | None:
    """What can be refused before Hydra composes: an unparsable override, another command's experiment, a torchrun
    rank without a shared run folder; and, where a config file in play marks a value the user must give
    (``???`` or ``${required:}``), everything :func:`check_overrides` checks, so the missing value is named
    before Hydra makes a run folder. Elsewhere Hydra's own composition is the only one."""
    problem, overrides = _parse(config_name, args)
    if problem is None and any(REQUIRED in text or "???" in text for text in _files_in_play(config_name, overrides)):
        problem = check_overrides(config_name, args)
    return problem


def _files_in_play(config_name: str, overrides: list[str]) -> list[str]:
    """The text of the command's config and those it extends, each group option named on the command line,
    and the group options each named experiment selects in its defaults list."""
    conf = Path(CONF_DIR)
    names = dict.fromkeys([config_name, _base_config(config_name)])
    files = [conf / f"{name}.yaml" for name in names]
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        files.append(conf / key / f"{value}.yaml")
        if key == "experiment" and (conf / key / f"{value}.yaml").is_file():
            for entry in OmegaConf.load(conf / key / f"{value}.yaml").get("defaults") or []:
                for group, option in (entry.items() if isinstance(entry, DictConfig) else []):
                    files.append(conf / str(group).removeprefix("override ").strip("/") / f"{option}.yaml")
    return [path.read_text() for path in files if path.is_file()]


def composition_problem(err: BaseException, config_name: str) -> str | None:
    """One line for an error of composing the config or starting its job: Hydra's composition errors (an unknown key,
    a missing group option), a config file that is not YAML, a ``--config-dir`` that does not exist, a run folder
    that cannot be created. None for others (errors of the job itself)."""
    name, module = type(err).__name__, type(err).__module__
    if name in COMPOSITION_ERRORS and module.startswith("hydra"):  # first: MissingConfigException is an OSError
        return _one_line(err, config_name)
    if name == "SearchPathException" and module.startswith("hydra"):
        return f"{err}: pass --config-dir <an existing folder of configs>"
    if (mark := getattr(err, "problem_mark", None)) is not None and module.startswith("yaml"):
        return (f"config file {mark.name} is not valid YAML: {err.problem} at line {mark.line + 1}, column "
                f"{mark.column + 1}")
    if isinstance(err, OSError) and err.filename and _raised_making_the_job_folder(err):
        return (f"cannot create the output folder {err.filename}: {err.strerror} (set hydra.run.dir, or hydra.sweep.dir "
                "with -m, to a folder that can be created)")
    return None


def _raised_making_the_job_folder(err: OSError) -> bool:
    """Whether ``err`` came from Hydra creating an output folder (the run or sweep folder, or its ``.hydra`` files):
    the innermost frame outside pathlib is Hydra's, not the job's."""
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    inner = [name for name in frames if not name.endswith("pathlib.py")]
    return bool(inner) and f"{os.sep}hydra{os.sep}" in inner[-1] and "site-packages" in inner[-1]


def missing_values_problem(cfg: DictConfig, config_name: str) -> str | None:
    """One line naming the values the user must still give in the composed ``cfg``, or None."""
    missing = [key for key in _missing_values(cfg) if not key.startswith("hydra.")]
    return _required(missing, config_name) if missing else None


def _parse(config_name: str, args: list[str]) -> tuple[str | None, list[str]]:
    """(a problem found without composing, or None; the overrides to compose with, sweeps at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    overrides, experiments = [], []
    parser = OverridesParser.create()
    for i, arg in enumerate(args):
        if not arg.strip() and not (i and args[i - 1] in VALUE_FLAGS):
            return "an empty argument on the command line (an unset shell variable?): remove it", []
        if arg.startswith("-") or "=" not in arg or arg.startswith("hydra"):
            continue  # flags (-m, --cfg job) and Hydra's own settings are Hydra's to check
        if i and args[i - 1] in ("-sc", "--shell-completion"):
            continue  # install=bash, query=bash: a shell-completion request, not a config key
        try:
            override = parser.parse_override(arg)
        except HydraException as err:  # the lexer's errors (a non-ASCII character) are not OverrideParseException
            return f"cannot parse override {arg!r}: {str(err).splitlines()[0]}{_how_to_quote(arg)}", []
        if override.key_or_group == "experiment":
            experiments += (list(override.sweep_string_iterator()) if override.is_sweep_override()
                            else [override.get_value_element_as_str()])
        if override.is_sweep_override():
            if override.value_type == ValueType.INTERVAL_SWEEP:
                continue  # interval(a,b): the sweeper (Optuna) draws the values; nothing to enumerate here
            arg = f"{override.get_key_element()}={next(override.sweep_string_iterator())}"
        overrides.append(arg)
    return _experiment_of_another_command(config_name, experiments) or _torchrun_without_run_dir(args), overrides


# Hydra's flags whose next word is their value, not an override
VALUE_FLAGS = ("-sc", "--shell-completion", "-cd", "--config-dir", "-cp", "--config-path", "-cn", "--config-name",
               "-c", "--cfg", "-p", "--package", "--info")


def quote_values(args: list[str]) -> list[str]:
    """The command line with the values Hydra's grammar cannot read unquoted put in quotes for it: an existing path
    holding ``=`` or ``,`` (every multirun job folder's name does) and plain non-ASCII text (``sample.prompt=Été``).
    Anything else stays as typed; a value that still does not parse is named by :func:`_parse` with the way to
    quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()

    def parsed(arg: str) -> tuple[bool, bool]:  # (parses, is a sweep)
        try:
            return True, parser.parse_override(arg).is_sweep_override()
        except HydraException:
            return False, False

    quoted_args = []
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if (arg.startswith("-") or (i and args[i - 1] in VALUE_FLAGS) or not value
                or not re.fullmatch(r"[+~]{0,2}[\w.@/:-]+", key) or value[0] in "'\"[{"):
            quoted_args.append(arg)
            continue
        parses, sweep = parsed(arg)
        plain_text = not value.isascii() and not any(c in value for c in ",[]{}()'\"\\")
        if (not parses or sweep) and (os.path.exists(value) or (not parses and plain_text)):
            quote = "'" if "'" not in value else '"'
            candidate = f"{key}={quote}{value}{quote}"
            if parsed(candidate) == (True, False):
                arg = candidate
        quoted_args.append(arg)
    return quoted_args


def _how_to_quote(arg: str) -> str:
    """``; quote the value: 'ckpt_path="a=b"'``: Hydra's quotes inside the shell's."""
    key, _, value = arg.partition("=")
    if not value or "'" in value or '"' in value:
        return ""
    return f"; quote the value for Hydra inside the shell's quotes: '{key}=\"{value}\"'"


def _experiment_of_another_command(config_name: str, experiments: list[str]) -> str | None:
    """``experiment=sst2_head is for lm-lightning finetune: run lm-lightning finetune experiment=sst2_head``: each
    experiment names its command (its ``command`` key). Commands built on another's config (distill and scaling
    plan on train's) share their experiments; an experiment file that does not exist is left to composition."""
    for name in experiments:
        path = Path(CONF_DIR) / "experiment" / f"{name}.yaml"
        command = OmegaConf.load(path).get("command") if path.is_file() else None
        if command and _base_config(command.replace(" ", "_")) != _base_config(config_name):
            return f"experiment={name} is for lm-lightning {command}: run lm-lightning {command} experiment={name}"
    return None


def _base_config(config_name: str) -> str:
    """The top-level config that ``config_name`` extends through its defaults list (distill: train), else itself."""
    path = Path(CONF_DIR) / f"{config_name}.yaml"
    defaults = (OmegaConf.load(path).get("defaults") or []) if path.is_file() else []
    for entry in defaults:
        if isinstance(entry, str) and entry != "_self_" and (Path(CONF_DIR) / f"{entry}.yaml").is_file():
            return _base_config(entry)
    return config_name


def _torchrun_without_run_dir(args: list[str]) -> str | None:
    """torchrun starts every process of a job itself, each at its own moment: without one ``hydra.run.dir``
    each would time-stamp a run folder of its own (and its own run record and tracker run)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if any(arg.startswith("hydra.run.dir=") for arg in args):
        return None
    return ("this process is one of the ranks torchrun started: give every rank the same run folder with "
            "hydra.run.dir=<a folder every node can reach>")


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
