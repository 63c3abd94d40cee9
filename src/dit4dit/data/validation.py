"""Bounded descriptions of untrusted values, for error messages and log lines.

Anything that names a received value in an error (a state vector, the keys of an observation,
a prompt) goes through these helpers, so an error frame or a log line stays a few hundred bytes
whatever arrives: a summary (type, shape, dtype, a few leading entries) and a size, never the raw
input.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

MAX_ERROR_CHARS = 1000  # longest error message sent to a client or written to the log
MAX_KEY_CHARS = 64  # longest key name quoted in an error
MAX_KEYS_LISTED = 12  # keys quoted before "... and N more"


def clip_text(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was when cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    tail = f"... [{len(text)} characters, cut]"
    return text[:max(0, limit - len(tail))] + tail


def describe_key(key: Any) -> str:
    """``repr`` of a key, cut to :data:`MAX_KEY_CHARS`."""
    if isinstance(key, (str, bytes)):
        r = repr(key[:MAX_KEY_CHARS])
        return r if len(key) <= MAX_KEY_CHARS else f"{r}... ({len(key)} characters)"
    return f"<{type(key).__name__}>"


def describe_keys(keys: Iterable[Any]) -> str:
    """A bounded list of keys: ``['a', 'b', ... and 999 more (1001 keys)]``."""
    keys = list(keys)
    try:
        keys = sorted(keys, key=str)
    except Exception:  # noqa: BLE001 - unsortable keys are listed in arrival order
        pass
    shown = ", ".join(describe_key(k) for k in keys[:MAX_KEYS_LISTED])
    if len(keys) > MAX_KEYS_LISTED:
        shown += f", ... and {len(keys) - MAX_KEYS_LISTED} more ({len(keys)} keys)"
    return f"[{shown}]"


def describe_value(value: Any, entries: int = 4) -> str:
    """Type, shape, dtype and a few leading entries of ``value`` (bounded, whatever its size)."""
    if isinstance(value, np.ndarray):
        head = ""
        if value.dtype.kind in "biuf" and value.size:
            flat = value.reshape(-1)[:entries]
            head = ", first " + np.array2string(flat, precision=4, separator=", ", threshold=entries)
        return f"array of shape {list(value.shape)}, dtype {value.dtype}, {value.nbytes} bytes{head}"
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} of length {len(value)}: {describe_key(value)}"
    if isinstance(value, (list, tuple, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    return type(value).__name__
