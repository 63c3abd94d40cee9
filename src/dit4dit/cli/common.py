"""Pieces several commands share: preset/override flags, torch threads, subcommand tables, the
serving token, and the environments that register schemas on import."""

from __future__ import annotations

import argparse
import os
import weakref
from pathlib import Path

Subparsers = argparse._SubParsersAction
"""The subcommand table `add_subparsers` returns; every command's `register` adds its parser to one."""

# top-level table -> {command name: that command's own subcommand table} (`bench`, `eval`, `collect`, `dataset`)
_TABLES: weakref.WeakKeyDictionary[Subparsers, dict[str, Subparsers]] = weakref.WeakKeyDictionary()


def subcommand_table(sub: Subparsers, name: str, *, help: str, dest: str, metavar: str | None = None) -> Subparsers:
    """The subcommand table of command `name` (e.g. `bench`) in `sub`, created with the command on
    first use, so that more subcommands (`bench data`, `eval toy`, ...) can be added to it later."""
    tables = _TABLES.setdefault(sub, {})
    if name not in tables:
        parser = sub.add_parser(name, help=help)
        tables[name] = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    return tables[name]


def add_preset_args(p: argparse.ArgumentParser) -> None:
    """`--preset`, repeatable `--set KEY=VALUE` and `--json`."""
    from ..config import preset_names

    p.add_argument("--preset", default="tiny", help=f"named config: {', '.join(preset_names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set action.num_layers=8 (repeatable)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def set_threads(n: int | None) -> None:
    """torch CPU threads: `n`, or by default one per core (at most torch's own default)."""
    import torch

    if n is None:
        # Few cores: one thread per core, and tiny matmuls are far faster on fewer threads.
        n = max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
    torch.set_num_threads(n)


def set_threads_if_given(n: int | None) -> None:
    """torch CPU threads = `n` when given (non-zero); torch's default otherwise."""
    if n:
        import torch

        torch.set_num_threads(n)


def serve_token(args: argparse.Namespace) -> str | None:
    """The shared secret of `serve` and of the evaluation clients: `--token-file`, `--token` or
    $DIT4DIT_SERVE_TOKEN, in that order; None when none is given. An empty one is an error, never
    "no authentication"."""
    from ..config import ConfigError
    from ..serve.server import TOKEN_ENV

    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {args.token_file}: cannot read it ({e})") from e
        if not token:
            raise ConfigError(f"--token-file {args.token_file}: the file is empty; write the token into it, or "
                              "leave --token-file out to serve without authentication")
        return token
    if getattr(args, "token", None) is not None:
        if not args.token.strip():
            raise ConfigError("--token is empty; give a non-empty token, or leave --token out to serve without "
                              "authentication")
        return args.token.strip()
    if TOKEN_ENV in os.environ:
        if not os.environ[TOKEN_ENV].strip():
            raise ConfigError(f"${TOKEN_ENV} is set but empty; set it to a non-empty token, or unset it to serve "
                              "without authentication")
        return os.environ[TOKEN_ENV].strip()
    return None
