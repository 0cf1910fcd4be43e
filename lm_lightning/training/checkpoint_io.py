"""Checkpoints that survive a crash mid-write and refuse to load when corrupted.

Each save serialises to memory, writes ``<name>.tmp``, fsyncs it and renames it over
``<name>`` (a rename is atomic on POSIX file systems), keeping the file it replaces as
``<name>.prev``. A sidecar ``<name>.sha256`` records the SHA-256 and size; loading checks it
and, on a mismatch, names the previous good checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lm_lightning.errors import UserError
from lm_lightning.data.hashing import file_sha256


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _accepted(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(_sidecar(path).read_text())["accepted"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _write_sidecar(path: Path, accepted: list[dict[str, Any]]) -> None:
    _write_synced(_sidecar(path), json.dumps({"accepted": accepted}).encode())


def write_checkpoint_file(data: bytes, path: str | Path) -> None:
    """Atomically replaces ``path`` with ``data``; the file it replaces is kept as ``.prev``.

    The sidecar lists the checksums a file at ``path`` may have. While the data file is being
    swapped it lists both the old and the new one, so a kill at any point leaves a ``path``
    that is complete and passes its check (or, before the swap, the old file untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = _digest(data)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    old = _accepted(path) if path.exists() and checksum_ok(path) else []
    if old:  # keep the current good checkpoint as .prev (a hard link: no copy, no window without a file)
        link = path.with_name(path.name + ".prev.tmp")
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, _previous(path))
        _write_sidecar(_previous(path), old)
    _write_sidecar(path, [new, *old])
    os.replace(tmp, path)
    _write_sidecar(path, [new])
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames themselves reach the disk
    finally:
        os.close(dir_fd)


def checksum_ok(path: str | Path) -> bool:
    """True when ``path`` has one of the sizes and SHA-256s its sidecar accepts (no sidecar: not trusted)."""
    path = Path(path)
    accepted = _accepted(path)
    size = path.stat().st_size if path.exists() else -1
    if not any(d.get("bytes") == size for d in accepted):
        return False
    digest = file_sha256(path)
    return any(d.get("sha256") == digest for d in accepted)


def verify_checkpoint(path: str | Path) -> None:
    """Raises a UserError naming the file (and the previous good checkpoint) unless ``path`` verifies.

    A checkpoint with no sidecar (written elsewhere) is accepted: there is nothing to check it against.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (pass ckpt_path=<an existing .ckpt file>)")
    if not _sidecar(path).exists() or checksum_ok(path):
        return
    previous = _previous(path)
    offer = (f"; the previous good checkpoint is {previous}: pass ckpt_path={previous}"
             if previous.exists() and checksum_ok(previous) else "; no earlier good checkpoint was kept")
    raise UserError(f"checkpoint {path} fails its SHA-256 check (truncated or modified){offer}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with fsync'd atomic replacement, checksums and verification on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_checkpoint_file(buffer.getvalue(), path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        verify_checkpoint(path)
        return torch.load(path, map_location=map_location or "cpu", weights_only=False if weights_only is None else weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        for extra in (_sidecar(Path(path)), _previous(Path(path)), _sidecar(_previous(Path(path)))):
            extra.unlink(missing_ok=True)
