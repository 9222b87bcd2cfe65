"""The command line's own error: a user mistake, reported as one line on stderr (exit status 2)."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the command's input: reported as one line, no traceback."""
