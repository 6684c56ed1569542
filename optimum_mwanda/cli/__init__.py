"""The ``optimum-mwanda`` command line (also reachable as ``optimum-cli prune`` / ``optimum-cli mwanda``).

Commands: ``prune``, ``eval``, ``sweep`` and ``card``; see ``docs/cli.md`` or ``optimum-mwanda COMMAND --help``.
Exit codes: 0 success, 2 invalid arguments/config/data (found before any model is loaded), 1 failure.

Only the argument definitions (standard library) are imported up front: ``--help`` and argparse's errors
answer without importing torch; ``commands`` (and with it torch and transformers) loads once a command runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._lazy import lazy_attributes as _lazy_attributes
from .arguments import build_parser
from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

if TYPE_CHECKING:
    from .commands import execute

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "execute", "main"]

__getattr__ = _lazy_attributes(__name__, {"execute": ".commands"})


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``optimum-mwanda`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code.

    Bad flags make argparse exit with code 2 (``SystemExit``), like every other usage error.
    """
    from ..version import __version__

    parser = build_parser(version=__version__)
    args = parser.parse_args(None if argv is None else list(argv))
    from .commands import execute

    return execute(args.command, args, prog=f"{parser.prog} {args.command}")
