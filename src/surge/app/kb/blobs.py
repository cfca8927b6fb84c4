"""Uploaded files on disk, named by their content's sha256 (so a user's file name never
becomes a path, and two uploads of the same bytes are stored once)."""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
COPY_CHUNK_BYTES = 256 * 1024


def sha256_hex(data: bytes) -> str:
    """The content hash documents are deduplicated by."""
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Files under `root/ab/abcdef...`; blocking I/O, so callers run it in a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store `data` (once) and return its sha256; readers never see a partial file."""
        return self.put_file(io.BytesIO(data))

    def put_file(self, file: BinaryIO) -> str:
        """Store the rest of `file` (once) and return its sha256: copied in chunks into a
        temporary file, hashed on the way (never held whole in memory), then renamed to its
        hash, so readers never see a partial file."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".upload-")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                while chunk := file.read(COPY_CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            sha256 = digest.hexdigest()
            target = self.path(sha256)
            if target.exists():
                Path(tmp).unlink()
                return sha256
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return sha256

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
