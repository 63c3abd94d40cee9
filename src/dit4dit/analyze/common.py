"""What the analysis modules share: where a study keeps each run, its JSON files, matplotlib.

Layout of a study folder ``OUT``: ``runs/<group>/<cell>/seed_<s>/`` per cell and seed
(:func:`run_dir`) and ``pretrain/<name>/`` per shared pretraining run (:func:`pretrain_dir`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.frame_cache import CACHE_DIRNAME, dataset_fingerprint
from ..filehash import file_sha256
from ..jsonio import read_json, write_json

if TYPE_CHECKING:
    from .grid import Cell


def pretrain_dir(out: str | Path, name: str) -> Path:
    """The folder of a shared pretraining run; its trainer run folder is ``train/`` inside."""
    return Path(out) / "pretrain" / name


def run_dir(out: str | Path, cell: "Cell", seed: int) -> Path:
    """The folder of one cell x seed of a study."""
    return Path(out) / "runs" / cell.group / cell.name / f"seed_{seed}"


def read_record(path: str | Path) -> Any:
    """A study record (result, settings, plan, ...); None when the file is missing, unreadable or
    not valid JSON (a run that has not produced it yet, or was cut while writing it)."""
    try:
        return read_json(path, "study record")
    except ValueError:
        return None


def write_record(path: str | Path, obj: Any) -> None:
    """Write a study record atomically (indented; values JSON cannot encode are written as text)."""
    write_json(path, obj, indent=2, default=str)


def data_identity(path: str | Path) -> str:
    """``sha256:<hex>`` of what a training dataset holds: a LeRobot folder's metadata and data, video
    and image files (:func:`~dit4dit.data.frame_cache.dataset_fingerprint`), any other folder's files
    (relative paths and content; caches left out). A run stores it, so a study moved to another
    folder or machine reuses a stored run only when its data is byte for byte the same."""
    root = Path(path).expanduser().resolve()
    stamp = [(p.as_posix(), st.st_size, st.st_mtime_ns) for p in _files(root) for st in [p.stat()]]
    return _identity(str(root), tuple(stamp))


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and CACHE_DIRNAME not in p.relative_to(root).parts)


@functools.lru_cache(maxsize=8)
def _identity(root: str, stamp: tuple) -> str:  # hashed once per process while no file changes
    folder = Path(root)
    if (folder / "meta" / "info.json").is_file():
        return "sha256:" + dataset_fingerprint(folder)
    h = hashlib.sha256()
    for p in _files(folder):
        h.update(f"{p.relative_to(folder).as_posix()}:{file_sha256(p)}\n".encode())
    return "sha256:" + h.hexdigest()


