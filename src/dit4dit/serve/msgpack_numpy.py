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

Bounds. :func:`unpackb` also bounds the *cost* of a message (:class:`DecodeLimits`): at most
``max_array_len`` elements in one array, ``max_map_len`` entries in one map, ``max_containers``
arrays and maps in the whole message and ``max_items`` elements and entries in all of them
together. The counts are checked while decoding (the per-container lengths before the container
is allocated), so a message of millions of tiny maps fails after a few thousand instead of
building gigabytes of Python objects: the memory of one decode is at most about twice the
message's bytes (arrays are copied out of it) plus ``max_items`` small objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

__all__ = ["WireFormatError", "DecodeLimits", "pack_array", "unpack_array", "packb", "unpackb", "Packer"]

# numpy dtype kinds allowed on the wire: bool, signed/unsigned int, float, complex, bytes, unicode.
_SAFE_KINDS = frozenset("biufcSU")
_MAX_DIMS = 32


class WireFormatError(ValueError):
    """A message that is not valid msgpack-numpy (the message says what is wrong)."""


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on one decoded message (see the module docstring). The defaults leave room for
    any observation (a few dozen maps and arrays: cameras, state vectors, a prompt, the array
    wrappers) by two orders of magnitude."""

    max_containers: int = 4096  # arrays + maps in one message
    max_items: int = 65536  # elements of all arrays + entries of all maps
    max_array_len: int = 4096  # elements of one array
    max_map_len: int = 1024  # entries of one map


DEFAULT_LIMITS = DecodeLimits()


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


def unpackb(data: bytes, limits: DecodeLimits | None = None) -> Any:
    """Deserialise one message; raises :class:`WireFormatError` on anything malformed or over
    ``limits`` (default :data:`DEFAULT_LIMITS`)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected a binary message, got {type(data).__name__}")
    lim = limits or DEFAULT_LIMITS
    counts = [0, 0]  # containers, items

    def count(n: int) -> None:
        counts[0] += 1
        counts[1] += n
        if counts[0] > lim.max_containers:
            raise WireFormatError(f"the message holds more than {lim.max_containers} arrays and maps")
        if counts[1] > lim.max_items:
            raise WireFormatError(f"the message's arrays and maps hold more than {lim.max_items} elements in all")

    def object_hook(obj: dict) -> Any:
        count(len(obj))
        return unpack_array(obj)

    def list_hook(obj: list) -> list:
        count(len(obj))
        return obj

    try:
        return msgpack.unpackb(data, object_hook=object_hook, list_hook=list_hook, raw=False,
                               max_array_len=lim.max_array_len, max_map_len=lim.max_map_len, max_ext_len=0)
    except WireFormatError:
        raise
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError, UnicodeDecodeError,
            RecursionError) as e:
        raise WireFormatError(f"malformed msgpack ({type(e).__name__}: {e})") from e
    except Exception as e:  # noqa: BLE001 - msgpack raises a few other types on truncated data
        raise WireFormatError(f"malformed msgpack ({type(e).__name__}: {e})") from e
