"""File checksums shared by the corpus cache and the checkpoint writer."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks so large files never sit in memory whole."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            sha.update(chunk)
    return sha.hexdigest()
