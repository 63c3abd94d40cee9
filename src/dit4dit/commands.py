"""Subcommands beyond the core ones in cli.py, each registered by a function taking the subparsers."""

from __future__ import annotations

REGISTRATIONS: list = []
