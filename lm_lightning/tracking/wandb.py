"""W&B logger that never blocks: online when the user is logged in, offline otherwise."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from lm_lightning.errors import UserError

MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials_present() -> bool:
    """True when W&B would find credentials for its configured host, the way the installed wandb looks:
    ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE``, a netrc entry for the host of ``base_url`` (the
    ``WANDB_BASE_URL`` variable, wandb's settings files, else wandb's default host), or a key in its settings.

    Reads files only: never prompts and never touches the network.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import read_netrc_auth
    except ImportError:  # another wandb than the one this was written for: its old default host, by hand
        return _netrc_has(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        settings = wandb_setup.singleton().settings  # environment and settings files; starts no service
        return bool(settings.api_key) or read_netrc_auth(host=settings.base_url) is not None
    except (AuthenticationError, ValueError, OSError):  # a malformed key or setting: W&B would refuse it too
        return False


def _netrc_has(base_url: str) -> bool:
    host = urlparse(base_url).hostname or base_url
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def keep_offline(mode: str) -> None:
    """An offline or disabled run connects to nothing: wandb 0.31 sends telemetry (OpenTelemetry metrics to
    its base_url) and error reports unless the process's own mode says offline, whatever ``wandb.init`` is
    given. The variables are inherited by the DDP ranks this process starts."""
    if mode in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = mode
        os.environ["WANDB_ERROR_REPORTING"] = "false"  # no Sentry/OpenTelemetry error reports
        _reread_wandb_settings(mode)


def _reread_wandb_settings(mode: str) -> None:
    """W&B reads its process settings (the mode that decides its telemetry) once per session and ignores later
    changes to its variables. A session that read them before the mode was known (``wandb_credentials_present`` reads the
    key from them) is ended, so that the run's session starts from the variables just set: otherwise the process
    stays online for W&B's own telemetry (it imported requests and built an OpenTelemetry exporter for every
    offline run, ~0.2 s)."""
    try:
        from wandb.sdk import wandb_setup
    except ImportError:
        return
    session = wandb_setup.singleton()
    settings = session.settings_if_loaded
    if settings is None or settings.mode == mode:
        return
    if session.most_recent_active_run is None:  # a run in progress keeps its session
        wandb_setup.teardown()


def check_mode(mode: str) -> None:
    """A mode W&B knows, and for ``online`` a key to log in with (no side effects: composition checks call it)."""
    if mode not in MODES:
        raise UserError(f"logger.wandb.mode={mode} is not a W&B mode: choose one of {', '.join(MODES)}")
    if mode == "online" and not wandb_credentials_present():
        # wandb would prompt for a key (or fail deep inside the logger's setup): say what to do instead
        raise UserError("logger.wandb.mode=online but no W&B key was found: run `wandb login` (or set WANDB_API_KEY), "
                        "or use logger.wandb.mode=offline")


def resolve_mode(mode: str) -> str:
    """``auto`` → ``WANDB_MODE`` if set, else online with credentials, else offline; offline and disabled
    also set the process's W&B variables so that nothing connects (``keep_offline``)."""
    check_mode(mode)
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")
        check_mode(mode)
    keep_offline(mode)  # every caller (the logger, prepare's report, the scaling plots) then stays off the network
    return mode


def wandb_logger(mode: str = "auto", save_dir: str = ".", **kwargs: Any) -> WandbLogger:
    """Lightning's WandbLogger with the mode resolved; quiet, and without the login prompt.

    The run id is kept in ``<save_dir>/wandb_run_id``: a job resumed in its own folder
    continues the same W&B run (online or offline) instead of starting a new one. Only global rank 0
    (``rank_zero_only.rank``, from torchrun's or SLURM's environment) writes that file, as only it
    creates the run: the ranks of a multi-node job share the run folder and would race to write it.
    """
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")  # the CSV log and the console keep the text; W&B keeps metrics
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    id_file = Path(save_dir) / "wandb_run_id"
    if "id" not in kwargs and rank_zero_only.rank == 0:
        if not id_file.is_file():
            alphabet = string.ascii_lowercase + string.digits  # the form of W&B's own run ids
            id_file.write_text("".join(secrets.choice(alphabet) for _ in range(8)))
        kwargs["id"] = id_file.read_text().strip()
    return WandbLogger(mode=resolve_mode(mode), save_dir=save_dir, anonymous=None, **kwargs)  # resume="allow" is its default
