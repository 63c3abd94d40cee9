"""`dit4dit stats`: streaming per-dimension statistics of a dataset."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Subparsers
from .output import emit


def register(sub: Subparsers) -> None:
    p = sub.add_parser("stats", help="streaming per-dimension statistics of a dataset")
    p.add_argument("path")
    p.add_argument("--schema", default=None, help="embodiment schema (default: every numeric key)")
    p.add_argument("--out", default=None, help="write the statistics JSON here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)


def cmd_stats(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.inspect import compute_stats

    r = compute_stats(args.path, args.schema, args.out)
    emit(args, r)
    return r
