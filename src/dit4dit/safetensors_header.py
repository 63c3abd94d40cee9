"""Cheap integrity checks of safetensors files: read the header only and check it against the file
size, so truncation and garbage are reported with the file's name before any tensor is loaded.
And the content hash of a file's tensors (:func:`tensors_sha256`), which, unlike the file's bytes,
is the same for the same tensors whatever order the writer gave the header."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def header_bytes(path: str | os.PathLike, error: type[Exception], max_header: int) -> tuple[bytes, int]:
    """(raw JSON header, file size); `error` naming the file if it cannot be a safetensors file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path}: corrupted safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > size - 8 or n > max_header:
                raise error(f"{path}: corrupted safetensors file (header length {n} does not fit a file "
                            f"of {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise error(f"{path}: cannot read ({e})") from e
    return raw, size


def read_header(path: str | os.PathLike, error: type[Exception], max_header: int) -> dict[str, Any]:
    """The parsed header, checked against the file size (truncation, garbage, bad offsets)."""
    path = Path(path)
    raw, size = header_bytes(path, error, max_header)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"{path}: corrupted safetensors file (unreadable header: {e})") from e
    data_len = size - 8 - len(raw)
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in v["data_offsets"])
            if not 0 <= a <= b:
                raise ValueError
        except (KeyError, TypeError, ValueError) as e:
            raise error(f"{path}: corrupted safetensors file (bad entry for tensor {k!r})") from e
        end = max(end, b)
    if end != data_len:
        raise error(f"{path}: corrupted or truncated safetensors file (the header describes {end} bytes of "
                    f"tensor data, the file holds {data_len})")
    return header


def tensors_sha256(path: str | os.PathLike, error: type[Exception] = ValueError,
                   max_header: int = 100 << 20) -> str:
    """sha256 (hex) of what a safetensors file holds: every tensor's name, dtype, shape and bytes in
    name order, then the metadata in key order. Equal for equal contents, unlike the file's own
    hash: the writer orders the header's metadata differently from one run to the next."""
    path = Path(path)
    header = read_header(path, error, max_header)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")  # read_header checked the length
        for name in sorted(k for k in header if k != "__metadata__"):
            entry = header[name]
            a, b = (int(x) for x in entry["data_offsets"])
            h.update(json.dumps([name, entry.get("dtype"), entry.get("shape"), b - a]).encode())
            f.seek(start + a)
            left = b - a
            while left:  # in blocks: a large model's tensors need not fit in memory at once
                block = f.read(min(left, 1 << 22))
                if not block:
                    raise error(f"{path}: truncated while hashing tensor {name!r}")
                h.update(block)
                left -= len(block)
    h.update(json.dumps(header.get("__metadata__") or {}, sort_keys=True).encode())
    return h.hexdigest()
