"""JSON files written atomically, read with errors that name the file, and values made JSON-safe.

Every JSON file the project writes (checkpoint metadata, dataset metadata, run reports, evaluation
results) goes through `write_json`: the text is written to a unique temporary file beside the target,
flushed to disk and renamed over it, so a crash leaves either the old file or the new one, never a
torn one. `read_json` raises the caller's error type with the path and what the file is for.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["read_json", "to_jsonable", "write_json"]


def to_jsonable(obj: Any) -> Any:
    """A structure of plain JSON values: dict keys become strings, tuples lists, numpy / torch arrays
    nested lists, paths strings, non-finite floats
    None (strict JSON has no NaN); anything else its `str`. Zero-dimensional arrays and tensors become
    plain numbers."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    # numpy scalars and arrays, torch tensors: duck-typed so this module imports neither
    if callable(getattr(obj, "tolist", None)):
        if tuple(getattr(obj, "shape", (None,))) == () and callable(getattr(obj, "item", None)):
            return to_jsonable(obj.item())
        return to_jsonable(obj.tolist())
    return str(obj)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               ensure_ascii: bool = True, default: Any = None) -> Path:
    """Write `obj` as JSON to `path` atomically (temporary file, fsync, rename); parents are created.
    `default` is passed to `json.dumps` for values it cannot encode (e.g. `str`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=default)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_json(path: str | Path, what: str = "JSON file", *, error: type[Exception] = ValueError) -> Any:
    """Parse `path`; a missing, unreadable or invalid file raises `error` naming the path and `what`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: missing {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable {what} ({e})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON in {what} ({e})") from e
