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

MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials_present() -> bool:
    """True when an API key is configured: ``WANDB_API_KEY`` or a netrc entry for the W&B host.

    Checked without calling W&B, so it never prompts and never touches the network.
    """
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """``auto`` → ``WANDB_MODE`` if set, else online with credentials, else offline."""
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}: choose one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")


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
