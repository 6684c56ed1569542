"""Registers optimum-mwanda with ``optimum-cli`` (optimum's command-plugin mechanism).

``optimum-cli`` imports every ``optimum/commands/register/register_*.py`` module it finds in the
``optimum.commands.register`` namespace package and registers the commands listed in its
``REGISTER_COMMANDS``. This file is shipped by the optimum-mwanda distribution and adds:

* ``optimum-cli prune ...``: the same as ``optimum-mwanda prune ...``;
* ``optimum-cli mwanda {prune,eval,sweep,card} ...``: the whole ``optimum-mwanda`` tool (backend, then
  action, like ``optimum-cli quanto quantize``).

``optimum-cli`` imports this module at every start (``optimum-cli export ...`` too), so it stays light: it
reads the argument definitions from ``optimum_mwanda/cli/arguments.py`` (standard library only) without
importing the ``optimum_mwanda`` package, whose torch and transformers imports wait until a command runs.
It must never break ``optimum-cli``: if optimum-mwanda cannot be found, no command is registered.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

_logger = logging.getLogger(__name__)
_ARGUMENTS_MODULE = "optimum_mwanda.cli.arguments"


def _load_arguments() -> ModuleType:
    """``optimum_mwanda.cli.arguments`` without running ``optimum_mwanda/__init__.py`` (about two seconds)."""
    if _ARGUMENTS_MODULE in sys.modules:
        return sys.modules[_ARGUMENTS_MODULE]
    # find_spec on a top-level name locates the package without importing it.
    spec = importlib.util.find_spec("optimum_mwanda")
    if spec is None:
        raise ImportError("the optimum_mwanda package is not installed")
    for location in spec.submodule_search_locations or []:
        path = Path(location) / "cli" / "arguments.py"
        if path.is_file():
            # A private name: this copy only defines parsers, it must not stand in for the real module.
            file_spec = importlib.util.spec_from_file_location("_optimum_mwanda_cli_arguments", path)
            if file_spec is None or file_spec.loader is None:
                break
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
            return module
    return importlib.import_module(_ARGUMENTS_MODULE)  # e.g. a zipped install: slower, still correct


class _MwandaLeafCommand(BaseOptimumCLICommand):
    """An ``optimum-mwanda`` command run through ``optimum-cli``."""

    MWANDA_COMMAND = ""

    @classmethod
    def parse_args(cls, parser) -> None:  # type: ignore[override]  # optimum calls it on the instance
        _ARGUMENTS.configure_parser(parser, cls.MWANDA_COMMAND)

    def run(self) -> None:
        # optimum-cli ignores run()'s return value, so the exit code is passed on with sys.exit.
        from optimum_mwanda.cli.commands import execute

        sys.exit(execute(self.MWANDA_COMMAND, self.args, prog=self.parser.prog))


def _leaf(command: str) -> type[_MwandaLeafCommand]:
    aliases = getattr(_ARGUMENTS, "COMMAND_ALIASES", {})  # deprecated names, e.g. sweep -> language-matrix
    help_text = _ARGUMENTS.COMMAND_HELP[aliases.get(command, command)]
    return type(
        f"Mwanda{command.title().replace('-', '')}Command",
        (_MwandaLeafCommand,),
        {"COMMAND": CommandInfo(command, help=help_text), "MWANDA_COMMAND": command, "__doc__": help_text},
    )


try:
    _ARGUMENTS = _load_arguments()
    _LEAVES = {
        command: _leaf(command)
        for command in [*_ARGUMENTS.COMMAND_HELP, *getattr(_ARGUMENTS, "COMMAND_ALIASES", {})]
    }

    class MwandaCommand(BaseOptimumCLICommand):
        """``optimum-cli mwanda``: pruning, evaluation, sweeps and model cards of optimum-mwanda."""

        COMMAND = CommandInfo(
            "mwanda", help="one-shot pruning of multilingual LMs (optimum-mwanda): prune, eval, sweep, card"
        )
        SUBCOMMANDS = tuple(
            CommandInfo(command, help=leaf.COMMAND.help, subcommand_class=leaf)
            for command, leaf in _LEAVES.items()
        )

    PruneCommand = _LEAVES["prune"]
    REGISTER_COMMANDS = [PruneCommand, MwandaCommand]
except Exception as error:  # a broken or half-removed install must not take optimum-cli down with it
    _logger.warning("optimum-mwanda commands are unavailable in optimum-cli: %s", error)
    REGISTER_COMMANDS = []
