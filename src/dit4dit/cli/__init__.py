"""The `dit4dit` command. Each subcommand prints `--help`, shows progress on long work on stderr,
and with `--json` prints one machine-readable JSON document on stdout."""

from __future__ import annotations

import argparse
import os
from types import ModuleType

from . import (analyze, bench, cache_frames, cache_latents, collect, dataset, demo, embed_text, eval, info, serve,
               stats, train)
from .output import log

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[ModuleType, ...] = (info, bench, dataset, stats, collect, train, demo, serve, eval, cache_frames,
                                    embed_text, cache_latents, analyze)
"""Every `dit4dit` command, in help order: one module each, whose `register(subparsers)` adds its parser
(and the `func` that runs it) to the top-level table."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit4dit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..config import ConfigError
    from ..data.frame_cache import FrameCacheError
    from ..data.normalize import NormalizationError
    from ..data.processor import ProcessorError
    from ..data.schema import SchemaError
    from ..data.video import DatasetError
    from ..train.checkpoint import CheckpointError

    return (ConfigError, DatasetError, SchemaError, ProcessorError, NormalizationError, FrameCacheError,
            CheckpointError, FileNotFoundError, FileExistsError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as e:
        # Bad input (config, dataset, schema, checkpoint, backbone, ...): the message names what is
        # wrong and where; a traceback adds nothing. DIT4DIT_DEBUG=1 shows it anyway.
        if os.environ.get("DIT4DIT_DEBUG"):
            raise
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    return 0

