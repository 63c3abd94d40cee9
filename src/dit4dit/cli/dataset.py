"""`dit4dit dataset info | check | show`: inspect a local LeRobot dataset (v2.1 or v3.0)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Subparsers, subcommand_table
from .output import emit


def register(sub: Subparsers) -> None:
    dsub = subcommand_table(sub, "dataset", help="inspect a local LeRobot dataset (v2.1 or v3.0)",
                            dest="dataset_command")

    q = dsub.add_parser("info", help="layout version, episodes, frames, fps, features, tasks")
    q.add_argument("path")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_dataset_info)

    q = dsub.add_parser("check", help="validate a dataset as training does (column widths against info.json, "
                                      "total_frames, episode lengths, frame indices, video time ranges); exit 2 "
                                      "with the first problem named")
    q.add_argument("path")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_dataset_check)

    q = dsub.add_parser("show", help="write the decoded frame(s) of every camera to a PNG; print state and action")
    q.add_argument("path")
    q.add_argument("--episode", type=int, default=0)
    q.add_argument("--frame", type=int, default=0)
    q.add_argument("--out", default="frame.png")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_dataset_show)


def cmd_dataset_info(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.inspect import dataset_info

    r = dataset_info(args.path)
    emit(args, r)
    return r


def cmd_dataset_check(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.inspect import dataset_check

    r = dataset_check(args.path)  # every check runs on open; a problem raises DatasetError
    emit(args, r, lambda r: f"{r['path']}: OK ({r['version']}, {r['episodes']} episodes, {r['frames']} frames, "
                            f"{r['video_files_checked']} video files)")
    return r


def cmd_dataset_show(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.inspect import dataset_show

    r = dataset_show(args.path, args.episode, args.frame, args.out)
    emit(args, r)
    return r
