"""The subcommands of ``mha2sha``: one module each, registered here in one line."""

from __future__ import annotations

from mha2sha.commands import analyze, build_ar, convert, verify

#: ``mha2sha <name>``: each module has ``add_parser(subparsers)``, which sets ``run``.
COMMANDS = (analyze, convert, verify, build_ar)

__all__ = ["COMMANDS"]
