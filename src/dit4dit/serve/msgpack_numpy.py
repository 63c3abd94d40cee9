"""msgpack with numpy arrays, in the wire format of the ``openpi-client`` package (no pickle).

An array travels as a plain msgpack map (no msgpack extension types)::

    {b"__ndarray__": True, b"data": <raw bytes, C order>, b"dtype": dtype.str, b"shape": [..]}

and a numpy scalar as ``{b"__npgeneric__": True, b"data": <Python value>, b"dtype": dtype.str}``.
The map keys are msgpack *binary* strings, as openpi-client writes them, so messages from either
side decode on the other. Everything else is ordinary msgpack (``use_bin_type=True`` on the way
out, ``raw=False`` on the way in: text is ``str``, binary is ``bytes``).

Decoding is defensive, because the server decodes bytes from the network: only plain numeric,
boolean, text and byte-string dtypes are accepted (never ``object`` or structured dtypes, which
could make numpy interpret attacker bytes as pointers), the dtype must be a string, the shape a
list of non-negative integers, and the data length must match the shape exactly. Any violation
raises :class:`WireFormatError`. Decoded arrays are writable copies.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

__all__ = ["WireFormatError", "pack_array", "unpack_array", "packb", "unpackb", "Packer"]

# numpy dtype kinds allowed on the wire: bool, signed/unsigned int, float, complex, bytes, unicode.
_SAFE_KINDS = frozenset("biufcSU")
_MAX_DIMS = 32


class WireFormatError(ValueError):
    """A message that is not valid msgpack-numpy (the message says what is wrong)."""


def pack_array(obj: Any) -> Any:
    """``default`` hook for msgpack: numpy arrays and scalars -> openpi-style maps."""
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind not in _SAFE_KINDS:
            raise TypeError(f"cannot send numpy dtype {obj.dtype} (kind {obj.dtype.kind!r}) over the wire")
        if isinstance(obj, np.ndarray):
            return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str,
                    b"shape": list(obj.shape)}
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    # torch tensors and other array-likes are not sent implicitly: convert on the caller's side.
    raise TypeError(f"cannot serialise object of type {type(obj).__name__} (send numpy arrays, numbers, "
                    "strings, bytes, lists and dicts)")


def _safe_dtype(spec: Any) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("ascii", errors="replace")
    if not isinstance(spec, str):
        raise WireFormatError(f"array dtype must be a string such as '<f4', got {type(spec).__name__}")
    try:
        dt = np.dtype(spec)
    except (TypeError, ValueError) as e:
        raise WireFormatError(f"unknown array dtype {spec!r}") from e
    if dt.kind not in _SAFE_KINDS or dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise WireFormatError(f"array dtype {spec!r} is not allowed (only bool, integer, float, complex, "
                              "bytes and str dtypes)")
    return dt


def unpack_array(obj: dict) -> Any:
    """``object_hook`` for msgpack: openpi-style maps -> numpy arrays and scalars.

    The marker keys are binary (as openpi-client writes them); text keys are accepted too, for
    clients in other languages that cannot easily write binary map keys."""
    if "__ndarray__" in obj or "__npgeneric__" in obj:
        obj = {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}
    if b"__ndarray__" in obj:
        dt = _safe_dtype(obj.get(b"dtype"))
        shape = obj.get(b"shape")
        if not isinstance(shape, (list, tuple)) or len(shape) > _MAX_DIMS or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise WireFormatError(f"array shape must be a list of non-negative integers, got {shape!r}")
        data = obj.get(b"data")
        if not isinstance(data, (bytes, bytearray)):
            raise WireFormatError(f"array data must be bytes, got {type(data).__name__}")
        want = math.prod(shape) * dt.itemsize
        if len(data) != want:
            raise WireFormatError(f"array of shape {list(shape)} and dtype {dt.str} needs {want} bytes of data, "
                                  f"got {len(data)}")
        return np.frombuffer(data, dtype=dt).reshape(shape).copy()
    if b"__npgeneric__" in obj:
        dt = _safe_dtype(obj.get(b"dtype"))
        value = obj.get(b"data")
        if isinstance(value, (dict, list)):
            raise WireFormatError("numpy scalar data must be a plain value")
        try:
            return dt.type(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise WireFormatError(f"bad numpy scalar {value!r} for dtype {dt.str}") from e
    return obj


class Packer:
    """A reusable packer (``Packer().pack(obj) -> bytes``), like openpi-client's."""

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=pack_array, use_bin_type=True)

    def pack(self, obj: Any) -> bytes:
        return self._packer.pack(obj)


def packb(obj: Any) -> bytes:
    """Serialise ``obj`` (dicts, lists, numbers, str, bytes, numpy arrays and scalars)."""
    return msgpack.packb(obj, default=pack_array, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Deserialise one message; raises :class:`WireFormatError` on anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected a binary message, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=unpack_array, raw=False)
    except WireFormatError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError, UnicodeDecodeError,
            RecursionError) as e:
        raise WireFormatError(f"malformed msgpack ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - msgpack raises a few other types on truncated data
        raise WireFormatError(f"malformed msgpack ({type(e).__name__}: {e})") from e
