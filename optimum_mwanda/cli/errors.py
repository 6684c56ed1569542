"""Errors of the command-line interface and their exit codes."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """An invalid argument, config or input file, found before any model is loaded (exit code 2).

    The message says what to change; no traceback is shown.
    """
