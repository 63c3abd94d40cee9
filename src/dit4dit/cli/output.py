"""What every command prints: progress and messages on stderr, its result on stdout.

A command's result is one JSON-ready value. `emit` prints it as JSON with `--json` (or when the
command has no text form), else as the command's text; `write_result` also writes it to a file
(the benchmarks' `--out`). Progress goes to stderr, so stdout carries nothing but the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from ..jsonio import write_json
from ..progress import progress_bar

__all__ = ["emit", "log", "progress_bar", "write_result"]


def log(msg: str) -> None:
    """One line on stderr, flushed at once."""
    print(msg, file=sys.stderr, flush=True)


def emit(args: argparse.Namespace, result: Any, human: Callable[[Any], str] | None = None) -> None:
    """Print `result` on stdout: JSON (indent 2) with `--json` or without a text form, else `human(result)`."""
    if getattr(args, "json", False) or human is None:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(human(result))


def write_result(path: str | None, result: Any) -> None:
    """Write a result as JSON to `path` (the `--out` option) atomically, creating its folder; no-op without one."""
    if path:
        write_json(path, result, indent=2, default=str)
