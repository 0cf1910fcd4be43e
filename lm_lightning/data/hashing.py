"""File checksums shared by the corpus cache and the checkpoint writer."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks so large files never sit in memory whole."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            sha.update(chunk)
    return sha.hexdigest()


class DigestMemo:
    """SHA-256 digests of source files, remembered in a JSON file (in the corpus cache), one record per path: the
    file's size, mtime and inode with its digest. A large corpus is read once to fingerprint it, not on every run; a
    file that changes in any of those is read again (and its record replaced); a copy of the same bytes elsewhere gives
    the same digest."""

    def __init__(self, memo_file: str | Path) -> None:
        self.memo_file = Path(memo_file)
        try:
            self.records: dict[str, list] = dict(json.loads(self.memo_file.read_text()))
        except (OSError, ValueError, TypeError):
            self.records = {}  # none yet, or unreadable: digests are recomputed, never trusted from a bad file
        self.changed = False

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp, key = [st.st_size, st.st_mtime_ns, st.st_ino], str(path.resolve())
        record = self.records.get(key)
        if isinstance(record, list) and record[:3] == stamp and isinstance(record[-1], str):
            return record[-1]
        digest = file_sha256(path)
        self.records[key] = [*stamp, digest]
        self.changed = True
        return digest

    def save(self) -> None:
        """Writes the memo if it gained digests (a temporary file then a rename, so readers never see half)."""
        if not self.changed:
            return
        tmp = self.memo_file.with_name(f".{self.memo_file.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.records, indent=0, sort_keys=True))
            os.replace(tmp, self.memo_file)
        except OSError:  # a read-only cache still works: the digests are only recomputed next time
            tmp.unlink(missing_ok=True)
