"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input or environment: reported as a single line, exit code 2, nothing written."""

    exit_code = 2
