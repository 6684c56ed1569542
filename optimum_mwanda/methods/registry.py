"""The one registry of pruning methods: names, titles, config and algorithm classes, CLI options.

Standard library only and no relative imports: the command-line parser (``cli/arguments.py``) loads this file
on its own to list ``--method`` choices and method flags without importing torch. Config and algorithm
classes are named as ``"module:attribute"`` strings and imported on first use, so the registry line of a
method costs nothing until the method runs.

Adding a method is one module (its config class, a frozen :class:`~optimum_mwanda.PruningConfig` subclass,
and its :class:`~optimum_mwanda.methods.PruningAlgorithm` subclass) and one :func:`register_method` line.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

#: the method the CLI and the examples prune with when none is named
DEFAULT_METHOD = "mwanda"


@dataclass(frozen=True)
class Description:
    """What one part of a method is: its role, name, explicit settings and the work it comes from.

    Attributes:
        role: ``"mask score"``, ``"weight update"`` or ``"layer schedule"``.
        name: a short name (``"Wanda score"``, ``"column sweep"``).
        summary: one sentence a model card can print.
        settings: the settings that apply, every value explicit (a run's resolved config never has ``None``).
        citation: key of the reference (``hub/citations.json``), ``None`` when there is none.
    """

    role: str
    name: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    citation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.name,
            "summary": self.summary,
            "settings": dict(self.settings),
            "citation": self.citation,
        }


@dataclass(frozen=True)
class MethodDescription:
    """A method as its parts: mask score, weight update and layer schedule (see :class:`Description`)."""

    method: str
    title: str
    summary: str
    parts: tuple[Description, ...]

    @property
    def citations(self) -> list[str]:
        """Citation keys of the parts, in order, without repeats."""
        return list(dict.fromkeys(part.citation for part in self.parts if part.citation))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "title": self.title,
            "summary": self.summary,
            "parts": [part.to_dict() for part in self.parts],
        }


@dataclass(frozen=True)
class CliOption:
    """A method-specific command-line flag that sets one config field (``--block-size`` -> ``block_size``).

    ``type`` is ``"int"``, ``"float"`` or ``"str"``; ``choices`` limits a ``"str"`` option.
    """

    field: str
    help: str
    type: str = "str"
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


@dataclass(frozen=True)
class MethodEntry:
    """One registered method. ``config`` and ``algorithm`` are classes or ``"module:attribute"`` names."""

    name: str
    title: str
    summary: str
    config: str | type
    algorithm: str | type
    cli_options: tuple[CliOption, ...] = ()

    def config_class(self) -> type:
        return _load(self.config)

    def algorithm_class(self) -> type:
        return _load(self.algorithm)


def _load(target: str | type) -> type:
    if not isinstance(target, str):
        return target
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(entry: MethodEntry, *, replace: bool = False) -> MethodEntry:
    """Add ``entry`` (``ValueError`` when its name is taken, unless ``replace``)."""
    if not isinstance(entry, MethodEntry):
        raise TypeError(f"register_method needs a MethodEntry, got {type(entry).__name__}")
    if not entry.name or not entry.name.replace("_", "").isalnum() or entry.name != entry.name.lower():
        raise ValueError(f"method names are lower-case letters, digits and '_', got {entry.name!r}")
    if entry.name in _REGISTRY and not replace:
        raise ValueError(f"a pruning method named {entry.name!r} is already registered")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_method(name: str) -> None:
    """Remove a registered method (tests and plugins that registered one for a while)."""
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def method_entry(name: str) -> MethodEntry:
    """The entry named ``name`` (``ValueError`` listing the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pruning method {name!r}; choose one of {sorted(_REGISTRY)}") from None


def entries() -> tuple[MethodEntry, ...]:
    return tuple(_REGISTRY.values())


_SWEEP_OPTIONS = (
    CliOption("hessian_token_stride", "column sweep: build the Hessian from every k-th token", "int"),
    CliOption("nm_selection", "column sweep at N:M: how each group's pruned weights are chosen", "str",
              ("greedy", "joint")),
    CliOption("refinement_steps", "column sweep: conjugate-gradient steps on the kept weights", "int"),
)  # fmt: skip

register_method(
    MethodEntry(
        "wanda",
        "Wanda",
        "weight magnitude times input activation norm",
        "optimum_mwanda.configuration:WandaConfig",
        "optimum_mwanda.methods.wanda:WandaAlgorithm",
    )
)
register_method(
    MethodEntry(
        "sparsegpt",
        "SparseGPT",
        "second-order pruning with weight reconstruction",
        "optimum_mwanda.configuration:SparseGPTConfig",
        "optimum_mwanda.methods.sparsegpt:SparseGPTAlgorithm",
        (
            CliOption("block_size", "column sweep: columns per lazy-update block", "int"),
            CliOption("dampening", "column sweep: share of the mean Hessian diagonal added to it", "float"),
            *_SWEEP_OPTIONS,
        ),
    )
)
register_method(
    MethodEntry(
        "mwanda",
        "M-Wanda",
        "Wanda with language-aware activation statistics",
        "optimum_mwanda.configuration:MWandaConfig",
        "optimum_mwanda.methods.mwanda:MWandaAlgorithm",
        (
            CliOption(
                "weight_update",
                "how the kept weights are updated (default: the sweep at N:M and from 65%% sparsity, the "
                "closed form below)",
                "str",
                ("closed_form", "sweep"),
            ),
            CliOption(
                "mean_compensation",
                "closed form: restore each row's mean output per language, pooled, or not at all",
                "str",
                ("language", "pooled", "none"),
            ),
            CliOption("activation_probability_weight", "weight of the activation-probability term", "float"),
        ),
    )
)
