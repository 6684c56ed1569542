"""Pruning methods: one unit per method, each made of parts (mask score, weight update, layer schedule).

The one registry of methods is :mod:`optimum_mwanda.methods.registry` (names, titles, config and algorithm
classes, CLI options); :func:`algorithm_for` picks a config's algorithm from it. Adding a method means one
new module with a config class and a :class:`PruningAlgorithm` subclass, plus one
:func:`~optimum_mwanda.methods.registry.register_method` line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import lazy_attributes as _lazy_attributes
from .registry import (
    CliOption,
    Description,
    MethodDescription,
    MethodEntry,
    entries,
    method_entry,
    method_names,
    register_method,
    unregister_method,
)

if TYPE_CHECKING:
    from ..configuration import PruningConfig
    from .base import PruningAlgorithm


def algorithm_for(config: PruningConfig) -> PruningAlgorithm:
    """The algorithm object that prunes with ``config`` (looked up by the config's exact class, so M-Wanda's
    config, a subclass of Wanda's, gets its own algorithm)."""
    for entry in entries():
        if entry.config_class() is type(config):
            return entry.algorithm_class()(config)
    known = ", ".join(entry.config_class().__name__ for entry in entries())
    raise TypeError(f"no pruning algorithm for {type(config).__name__}; use one of {known}")


def describe_method(config: PruningConfig) -> MethodDescription:
    """The method of ``config`` as its parts, every setting as ``config`` holds it (resolve it first for the
    explicit values of a run)."""
    return algorithm_for(config).describe()


def __getattr__(name: str) -> Any:
    if name == "ALGORITHMS":
        return {entry.config_class(): entry.algorithm_class() for entry in entries()}
    return _lazy(name)


_lazy = _lazy_attributes(
    __name__,
    {
        "PruningAlgorithm": ".base",
        "LayerSchedule": ".base",
        "WandaAlgorithm": ".wanda",
        "SparseGPTAlgorithm": ".sparsegpt",
        "MWandaAlgorithm": ".mwanda",
    },
)

__all__ = [
    "ALGORITHMS",
    "CliOption",
    "Description",
    "LayerSchedule",
    "MWandaAlgorithm",
    "MethodDescription",
    "MethodEntry",
    "PruningAlgorithm",
    "SparseGPTAlgorithm",
    "WandaAlgorithm",
    "algorithm_for",
    "describe_method",
    "method_entry",
    "method_names",
    "register_method",
    "unregister_method",
]
