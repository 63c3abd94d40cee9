"""What the analysis modules share: where a study keeps each run, its JSON files, matplotlib.

Layout of a study folder ``OUT``: ``runs/<group>/<cell>/seed_<s>/`` per cell and seed
(:func:`run_dir`) and ``pretrain/<name>/`` per shared pretraining run (:func:`pretrain_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
