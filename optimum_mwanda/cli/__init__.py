"""The ``optimum-mwanda`` command line (also reachable as ``optimum-cli prune`` / ``optimum-cli mwanda``).

Commands: ``prune``, ``eval``, ``sweep`` and ``card``; see ``docs/cli.md`` or ``optimum-mwanda COMMAND --help``.
Exit codes: 0 success, 2 invalid arguments/config/data (found before any model is loaded), 1 failure.
"""

from __future__ import annotations

from collections.abc import Sequence

from .arguments import build_parser
from .commands import execute
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "execute", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``optimum-mwanda`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Bad flags make argparse exit with code 2 (``SystemExit``), like every other usage error.
    """
    from ..version import __version__

    parser = build_parser(version=__version__)
    args = parser.parse_args(None if argv is None else list(argv))
    return execute(args.command, args, prog=f"{parser.prog} {args.command}")
