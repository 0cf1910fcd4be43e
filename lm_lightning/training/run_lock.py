"""One writer per run folder: ``<run>/.lock``, held with ``flock`` for as long as a job writes there.

Two jobs started into one ``hydra.run.dir`` would overwrite each other's ``best.ckpt``, write ``last-v1.ckpt``
beside the other's ``last.ckpt`` and share one W&B id; the second one stops instead, with one line naming the
process that holds the folder. The kernel releases a ``flock`` when its process dies (even by SIGKILL), so a
crashed run never leaves a stale lock: the file stays, the lock does not. Only the job's main process takes it
(global rank 0): the other ranks of a DDP, torchrun or SLURM job write into the same folder by design.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from lm_lightning.errors import UserError

LOCK_NAME = ".lock"
# every variable by which a launcher tells a process it is not the job's first: torchrun (RANK, GROUP_RANK),
# Lightning's own launcher (LOCAL_RANK, NODE_RANK), SLURM (SLURM_PROCID)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")

_held: dict[Path, int] = {}  # folder -> file descriptor of the locks this process holds
_unowned: set[Path] = set()  # held for a job not started yet (taken before Hydra writes the folder's config)


def is_main_process() -> bool:
    """True unless a launcher's rank variable says this process is not global rank 0."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def acquire(run_dir: str | Path, for_job: bool = False) -> bool:
    """Takes ``<run_dir>/.lock`` for this process; True when the caller now owns it and must release it (False:
    held already by this process, or not the main process). Raises UserError naming the holder when another
    process holds it. With ``for_job`` the lock is taken ahead of the job, which then owns it when it acquires."""
    folder = Path(run_dir).resolve()
    if folder in _unowned and not for_job:
        _unowned.discard(folder)
        return True
    if folder in _held or not is_main_process():
        return False
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(path)
        os.close(fd)
        raise UserError(f"run folder {folder} is in use by {holder}: wait for it to finish, or give this run "
                        f"another folder (hydra.run.dir=...)") from None
    except OSError:
        os.close(fd)  # a file system without flock (some network mounts): run without the guard
        return False
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    _held[folder] = fd
    if for_job:
        _unowned.add(folder)
        return False
    return True


def release(run_dir: str | Path) -> None:
    """Lets go of the folder's lock if this process holds it (the file stays: removing it would race a waiter)."""
    _unowned.discard(Path(run_dir).resolve())
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _describe(path: Path) -> str:
    """'process 123 on host, started 2026-...' from the holder's lock file (what it wrote when it took it)."""
    try:
        holder = json.loads(path.read_text())
        return f"process {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"  # it took the lock and has not written its line yet
