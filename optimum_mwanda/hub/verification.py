"""Measure the sparsity a model actually has, and check an N:M pattern. Reads weights only."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..configuration import parse_mask_structure
from ..modeling import PrunableLinear, find_decoder_stack
from ..modeling.coverage import plan_coverage
from ..modeling.linear import prunable_weights_by_layer
from ..modeling.offload import read_parameter

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class SparsityVerification:
    """What :func:`verify_sparsity` found.

    Attributes:
        module_sparsity: fraction of exactly-zero weights per checked module (full module name).
        module_numel: number of weights per checked module.
        overall: zeros over all checked weights (parameter-weighted).
        mask_structure: the N:M structure that was checked (``None`` when only sparsity was measured).
        nm_ok: ``True``/``False`` when an N:M structure was checked, ``None`` otherwise.
        violations: ``{module: number of M-groups with more than N non-zeros}`` for modules that break N:M.
    """

    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_numel: dict[str, int] = field(default_factory=dict)
    overall: float = 0.0
    mask_structure: str | None = None
    nm_ok: bool | None = None
    violations: dict[str, int] = field(default_factory=dict)

    @property
    def layer_sparsity(self) -> dict[int, float]:
        """Parameter-weighted sparsity per decoder layer index (modules without an index are left out)."""
        return group_by_layer(self.module_sparsity, self.module_numel)


def zero_fraction(weight: torch.Tensor) -> float:
    """Fraction of entries that are exactly zero."""
    if weight.numel() == 0:
        return 0.0
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of ``m`` consecutive input weights (per output row) holding more than ``n`` non-zeros.

    ``weight`` is ``[out_features, in_features]``. A trailing partial group (``in_features % m``) is checked
    against the same ``n``.
    """
    if weight.dim() != 2:
        raise ValueError(f"N:M needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    nonzero = (weight != 0).to(torch.int32)
    pad = (-cols) % m
    if pad:
        nonzero = torch.nn.functional.pad(nonzero, (0, pad))
    per_group = nonzero.view(rows, -1, m).sum(dim=-1)
    return int((per_group > n).sum())


def group_by_layer(values: dict[str, float], weights: dict[str, int]) -> dict[int, float]:
    """Weighted mean of per-module ``values`` per decoder layer, the layer being a module name's first index."""
    totals: dict[int, list[float]] = {}
    for name, value in values.items():
        match = _LAYER_INDEX.search(name)
        if match is None:
            continue
        acc = totals.setdefault(int(match.group(1)), [0.0, 0.0])
        acc[0] += value * weights[name]
        acc[1] += weights[name]
    return {layer: acc[0] / acc[1] for layer, acc in sorted(totals.items()) if acc[1]}


class _WholeParameter:
    """A decoder-layer weight the pruner cannot reach (e.g. an unsupported experts tensor), counted whole."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name

    def read_weight(self) -> torch.Tensor:
        return read_parameter(self.module, self.name)


def _prunable_linears(model: nn.Module, ignore: list[str]) -> dict[str, PrunableLinear]:
    """The decoder layers' matrices, found the way the pruner finds them: Linear/Conv1D modules, every
    expert's matrices of fused experts tensors (``<experts>.<param>[<expert>]``), and every weight the
    coverage plan calls unreachable (so that a weight left dense counts, dense)."""
    stack = find_decoder_stack(model)
    layers = prunable_weights_by_layer(stack, ignore)
    found = {linear.name: linear for linears in layers for linear in linears}
    named = dict(model.named_modules())
    for entry in plan_coverage(stack, layers, ignore).unreachable:
        module_name, _, leaf = entry.name.rpartition(".")
        found[entry.name] = _WholeParameter(named[module_name], leaf)  # type: ignore[assignment]
    return found


def verify_sparsity(
    model: nn.Module, mask_structure: str | None = None, modules: list[str] | None = None
) -> SparsityVerification:
    """Measure the achieved sparsity of a model's prunable modules and optionally check an N:M pattern.

    Args:
        model: a (possibly device-mapped or offloaded) transformers model.
        mask_structure: ``"N:M"`` to check (e.g. ``"2:4"``), ``"unstructured"`` to only measure. Defaults to the
            ``mask_structure`` recorded in ``model.config.sparsity_config`` when present.
        modules: full names of the modules to check. Defaults to the decoder layers' matrices as the pruner
            finds them (Linear/Conv1D modules, every expert's matrices of fused expert tensors named
            ``<experts>.<parameter>[<expert>]``, and, whole, any weight the pruner cannot reach), minus the
            ``ignore`` patterns recorded in ``model.config.sparsity_config``.

    Returns:
        A :class:`SparsityVerification`; ``nm_ok`` is ``None`` unless an N:M structure was checked.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"verify_sparsity needs a torch.nn.Module, got {type(model).__name__}")
    recorded = getattr(getattr(model, "config", None), "sparsity_config", None) or {}
    if mask_structure is None:
        mask_structure = recorded.get("mask_structure")
    nm = parse_mask_structure(mask_structure) if mask_structure is not None else None
    if modules is not None:
        candidates = _prunable_linears(model, [])
        missing = sorted(set(modules) - set(candidates))
        if missing:
            raise ValueError(
                f"modules {missing[:5]} are not prunable Linear/Conv1D modules of a decoder layer of this model"
            )
        candidates = {name: candidates[name] for name in modules}
    else:
        candidates = _prunable_linears(model, list(recorded.get("ignore", [])))
    if not candidates:
        raise ValueError("no prunable Linear/Conv1D modules found to verify")

    result = SparsityVerification(mask_structure=None if nm is None else f"{nm[0]}:{nm[1]}")
    zeros = total = 0
    for name, linear in candidates.items():
        # [out, in], read from the offload store when Accelerate keeps it there (one module at a time)
        weight = linear.read_weight()
        numel = weight.numel()
        module_zeros = numel - int(torch.count_nonzero(weight))
        # A whole unreachable tensor (3-D experts) is checked row by row of its last dimension.
        bad = nm_violations(weight.reshape(-1, weight.shape[-1]), *nm) if nm is not None else 0
        result.module_sparsity[name] = module_zeros / numel if numel else 0.0
        result.module_numel[name] = numel
        zeros += module_zeros
        total += numel
        if bad:
            result.violations[name] = bad
    result.overall = zeros / total
    if nm is not None:
        result.nm_ok = not result.violations
    return result
