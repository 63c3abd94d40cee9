"""Content hashes of files: what checkpoints record for their weight files and what a policy
server reports as the identity of the weights it serves."""
from __future__ import annotations

import hashlib
import os

__all__ = ["HASH_CHUNK", "file_sha256"]

HASH_CHUNK = 1 << 22  # bytes read at a time (4 MiB)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()
