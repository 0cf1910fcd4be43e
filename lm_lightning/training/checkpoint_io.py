"""Checkpoints that survive a crash mid-write and refuse to load when corrupted.

Each save serialises to memory, writes ``<name>.tmp``, fsyncs it and renames it over
``<name>`` (a rename is atomic on POSIX file systems), keeping the file it replaces as
``<name>.prev``. A sidecar ``<name>.sha256`` records the SHA-256 and size; loading checks it
and, on a mismatch, names the previous good checkpoint.

The SHA-256 also travels inside the file (the zip's comment field, which torch.load ignores), so a
checkpoint copied without its sidecar is still checked byte for byte. Every load uses
``weights_only=True``: a file whose pickle names anything but tensors and plain containers is refused
before any of it runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lm_lightning.data.hashing import file_sha256
from lm_lightning.errors import UserError


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


SEAL = b"lm-lightning-sha256:"  # then 64 hex digits: the SHA-256 of every byte before them
_SEAL_LEN = len(SEAL) + 64
_END_OF_ZIP = b"PK\x05\x06"  # the zip's end-of-central-directory record: 22 bytes, the comment after it


def seal(data: bytes) -> bytes:
    """``data`` (a torch.save zip) with its SHA-256 written as the zip's comment; unchanged if not a bare zip."""
    if len(data) < 22 or data[-22:-18] != _END_OF_ZIP or data[-2:] != b"\0\0":
        return data
    head = data[:-2] + _SEAL_LEN.to_bytes(2, "little") + SEAL
    return head + hashlib.sha256(head).hexdigest().encode()


def save_checkpoint_file(checkpoint: Any, path: str | Path) -> Path:
    """``torch.save`` of ``checkpoint``, sealed and written atomically with its sidecar."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_checkpoint_file(buffer.getvalue(), path)
    return Path(path)


def _seal_problem(path: Path) -> str | None:
    """Why the file's bytes cannot be trusted (a mismatched or damaged seal, a bad zip CRC), or None."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - _SEAL_LEN - 22))
        tail = f.read()
        f.seek(0)
        magic = f.read(2)
    if tail[-_SEAL_LEN:-64] == SEAL:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            remaining = size - 64
            while remaining > 0:
                chunk = f.read(min(1 << 22, remaining))
                digest.update(chunk)
                remaining -= len(chunk)
        return None if digest.hexdigest().encode() == tail[-64:] else "fails its built-in SHA-256 check"
    if magic != b"PK":
        return None  # not a zip (torch's legacy format, or not a checkpoint): torch.load decides
    if tail[-22:-18] != _END_OF_ZIP or tail[-2:] != b"\0\0":
        return "has a damaged end (its built-in SHA-256 or zip directory is broken)"
    try:  # written elsewhere, without a seal: the zip's own CRC-32 per member is what there is to check
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as err:
        return f"is not a readable zip ({err})"
    return None if bad is None else f"fails the CRC-32 check of its member {bad}"


def write_checkpoint_file(data: bytes, path: str | Path) -> None:
    """Atomically replaces ``path`` with ``data``; the file it replaces is kept as ``.prev``.

    The sidecar lists the checksums a file at ``path`` may have. While the data file is being
    swapped it lists both the old and the new one, so a kill at any point leaves a ``path``
    that is complete and passes its check (or, before the swap, the old file untouched).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = seal(data)
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
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync of a folder: the renames in it themselves reach the disk."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def replace_folder(new: str | Path, path: str | Path) -> None:
    """Puts the checkpoint folder ``new`` (a sharded checkpoint, written completely) at ``path``; the checkpoint
    already there is kept as ``<path>.prev``, as :func:`write_checkpoint_file` keeps a file's. Two renames: a kill
    between them leaves ``.prev`` whole (a folder cannot be swapped in one rename)."""
    new, path = Path(new), Path(path)
    previous = _previous(path)
    if path.exists():
        if previous.is_dir():
            shutil.rmtree(previous)
        else:
            previous.unlink(missing_ok=True)
        _sidecar(previous).unlink(missing_ok=True)
        os.replace(path, previous)
        _sidecar(path).unlink(missing_ok=True)  # a file checkpoint's sidecar does not describe a folder
    os.replace(new, path)
    _sync_folder(path.parent)


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

    Without a sidecar the SHA-256 sealed inside the file is checked (a file written elsewhere, with no
    seal: the CRC-32s of its zip members).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} (pass ckpt_path=<an existing .ckpt file>)")
    if not _sidecar(path).exists():
        if problem := _seal_problem(path):
            raise UserError(f"checkpoint {path} {problem}: it was damaged or modified after it was written; "
                            "pass another checkpoint")
        return
    if checksum_ok(path):
        return
    previous = _previous(path)
    offer = (f"; the previous good checkpoint is {previous}: pass ckpt_path={previous}"
             if previous.exists() and checksum_ok(previous) else "; no earlier good checkpoint was kept")
    raise UserError(f"checkpoint {path} fails its SHA-256 check (truncated or modified){offer}")


def refuse_unsafe(path: Any, err: pickle.UnpicklingError) -> UserError:
    """The one line for a file whose pickle would run code (torch's weights_only check refused it)."""
    found = re.search(r"GLOBAL (\S+)", str(err)) or re.search(r"(Unsupported operand \d+|Unsupported class \S+)", str(err))
    what = f" (it names {found.group(1).rstrip(',')})" if found else ""
    return UserError(f"checkpoint {path}{what} is not a plain lm-lightning checkpoint (it would run code when loaded); "
                     "load only checkpoints written by lm-lightning, or re-save its tensors with torch.save in a trusted session")


def load_checkpoint_file(source: Any, name: Any = None, **kwargs: Any) -> Any:
    """``torch.load(source, weights_only=True)``, the file verified first (sidecar or built-in SHA-256);
    a pickle that would run code is refused with one UserError naming ``name`` (default: ``source``)."""
    if isinstance(source, (str, Path)):
        verify_checkpoint(source)
    try:
        return torch.load(source, map_location=kwargs.pop("map_location", None) or "cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        raise refuse_unsafe(source if name is None else name, err) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O with fsync'd atomic replacement, checksums and verification on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        save_checkpoint_file(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True, whatever Lightning asks for: resuming must not run a file's code
        return load_checkpoint_file(path, map_location=map_location)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        for extra in (_sidecar(Path(path)), _previous(Path(path)), _sidecar(_previous(Path(path)))):
            extra.unlink(missing_ok=True)
