"""Safetensors files for checkpoints: written crash-safe (contiguous CPU tensors, no shared storage,
fsynced), read with validation (the header checked against the file size before anything is
loaded, clear errors naming the file), or viewed lazily (memory-mapped, one tensor at a time)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..safetensors_header import read_header


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupted or does not match the model/config."""


def fsync_path(path: Path) -> None:
    """fsync a file or folder (a folder's fsync makes a rename in it durable)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, none sharing storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{k}: expected a tensor, got {type(t).__name__}")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if t.numel():
            seen.add(ptr)
        out[k] = t
    return out


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Write ``tensors`` (see :func:`prepare_tensors`) with string ``metadata`` and fsync the file."""
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in (metadata or {}).items()}
    save_file(prepare_tensors(tensors), str(path), metadata=meta)
    fsync_path(path)


def tensor_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header against the file size (catches truncation and garbage)."""
    return read_header(path, CheckpointError, 512 * 1024 * 1024)


def read_safetensors(path: str | os.PathLike, what: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on CPU, with clear errors for missing/corrupted files."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what or 'file'}")
    tensor_header(path)
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: corrupted safetensors file ({type(e).__name__}: {e})") from e


class LazySafetensors(Mapping):
    """Read-only ``{name: tensor}`` view of a safetensors file that reads one tensor at a time
    (memory-mapped): resuming a large model on many ranks never holds the whole file per rank.
    ``shape(name)`` reads no data."""

    def __init__(self, path: str | os.PathLike, what: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: missing {what or 'file'}")
        header = tensor_header(self.path)
        self._shapes = {k: tuple(int(x) for x in v["shape"]) for k, v in header.items() if k != "__metadata__"}
        self._handle = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        from safetensors import safe_open

        try:
            if self._handle is None:
                self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            return self._handle.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.path}: corrupted safetensors file ({type(e).__name__}: {e})") from e

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (strings)."""
    return dict(tensor_header(Path(path)).get("__metadata__") or {})


def tensor_shape(t: torch.Tensor) -> tuple[int, ...]:
    """A tensor's shape as a tuple of ints."""
    return tuple(int(s) for s in t.shape)


def stored_shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of ``state[key]``, without reading the data when ``state`` is a lazy view."""
    return state.shape(key) if isinstance(state, LazySafetensors) else tensor_shape(state[key])
