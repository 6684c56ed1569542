"""The coverage contract: every matrix of the decoder layers is either pruned or named with a reason.

Before any weight changes the pruner lists every weight it will prune and every other parameter of two or
more dimensions inside the decoder layers, with why it stays dense (ignored by the user, router or gate,
norm, embedding, convolution, adapter, expert bias). A matrix that the method cannot reach (for example the
3-D expert tensors of an experts class that is not a transformers fused-experts module) is an error that
names it, unless the user opts in to leaving it dense (``allow_unpruned=True``): then a warning, and the
report keeps the entry and counts the weight, dense, in the achieved sparsity.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .adapters import canonical_name
from .decoder import matrix_rank
from .experts import ExpertWeight, fused_experts_of, is_router
from .linear import ALWAYS_DENSE, ancestors_of, is_prunable_linear, matches_pattern

logger = logging.getLogger(__name__)

PRUNED = "pruned"
DENSE = "dense"
UNREACHABLE = "unreachable"

#: reasons a decoder-layer matrix stays dense by design
REASONS = ("ignored", "router", "norm", "embedding", "conv", "adapter", "expert bias", "element-wise")


class IncompleteCoverageError(ValueError):
    """A decoder-layer weight that the pruning method cannot reach, refused before any weight changed."""


@dataclass(frozen=True)
class CoverageEntry:
    """One parameter of a decoder layer.

    Attributes:
        name: the full parameter name (``model.layers.0.mlp.experts.gate_up_proj``).
        shape: its shape.
        status: ``"pruned"``, ``"dense"`` (by design, see ``reason``) or ``"unreachable"`` (left dense
            although it is a matrix of the layer: only with ``allow_unpruned``).
        reason: why it is not (fully) pruned; empty for a fully pruned weight.
    """

    name: str
    shape: tuple[int, ...]
    status: str
    reason: str = ""

    @property
    def numel(self) -> int:
        total = 1
        for size in self.shape:
            total *= size
        return total


@dataclass
class CoveragePlan:
    """Every >= 2-D parameter of the decoder layers and what the run does with it.

    Attributes:
        entries: one :class:`CoverageEntry` per parameter, in layer order.
        allow_unpruned: whether unreachable weights were allowed to stay dense.
    """

    entries: list[CoverageEntry] = field(default_factory=list)
    allow_unpruned: bool = False

    def with_status(self, status: str) -> list[CoverageEntry]:
        return [e for e in self.entries if e.status == status]

    @property
    def pruned(self) -> list[CoverageEntry]:
        return self.with_status(PRUNED)

    @property
    def dense(self) -> list[CoverageEntry]:
        return self.with_status(DENSE)

    @property
    def unreachable(self) -> list[CoverageEntry]:
        return self.with_status(UNREACHABLE)

    @property
    def complete(self) -> bool:
        return not self.unreachable

    def reasons(self) -> dict[str, int]:
        """How many dense or unreachable parameters per reason."""
        counts: dict[str, int] = {}
        for entry in self.entries:
            if entry.status != PRUNED:
                key = entry.reason if entry.status == DENSE else UNREACHABLE
                counts[key] = counts.get(key, 0) + 1
        return counts

    def enforce(self, allow_unpruned: bool) -> None:
        """Refuse unreachable weights (:class:`IncompleteCoverageError`), or warn when they are allowed."""
        missing = self.unreachable
        if not missing:
            return
        listing = "; ".join(f"{e.name} {list(e.shape)}: {e.reason}" for e in missing[:6])
        more = f" (and {len(missing) - 6} more)" if len(missing) > 6 else ""
        if not allow_unpruned:
            raise IncompleteCoverageError(
                f"{len(missing)} weight(s) of the decoder layers cannot be pruned by this method and would stay "
                f"dense: {listing}{more}. Nothing was changed. Pass allow_unpruned=True (CLI: --allow-unpruned) "
                "to prune the rest and leave these dense (the report lists them and counts them in the achieved "
                "sparsity), or name them in config.ignore"
            )
        self.allow_unpruned = True
        logger.warning(
            "leaving %d unreachable weight(s) dense (allow_unpruned): %s%s", len(missing), listing, more
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "allow_unpruned": self.allow_unpruned,
            "entries": [dict(asdict(e), shape=list(e.shape)) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoveragePlan:
        entries = [
            CoverageEntry(e["name"], tuple(e["shape"]), e["status"], e.get("reason", ""))
            for e in data.get("entries", [])
        ]
        return cls(entries=entries, allow_unpruned=bool(data.get("allow_unpruned", False)))


def plan_coverage(stack, layer_weights: Sequence[Sequence[Any]], ignore: list[str]) -> CoveragePlan:
    """The plan of a run that prunes ``layer_weights`` (per decoder layer of ``stack``: its
    :class:`PrunableLinear` modules and :class:`ExpertWeight` matrices)."""
    plan = CoveragePlan()
    for index, layer in enumerate(stack.layers):
        layer_name = stack.layer_name(index)
        pruned_modules = {id(w.module) for w in layer_weights[index] if not isinstance(w, ExpertWeight)}
        expert_slices: dict[tuple[int, str], int] = {}
        for w in layer_weights[index]:
            if isinstance(w, ExpertWeight):
                key = (id(w.module), w.parameter)
                expert_slices[key] = expert_slices.get(key, 0) + 1
        modules = dict(layer.named_modules())
        for param_name, param in layer.named_parameters():
            if param.dim() < 2:
                continue
            sub_name, _, leaf = param_name.rpartition(".")
            owner = modules[sub_name] if sub_name else layer
            full = f"{layer_name}.{param_name}"
            shape = tuple(param.shape)
            if id(owner) in pruned_modules and leaf == "weight":
                plan.entries.append(CoverageEntry(full, shape, PRUNED))
                continue
            experts = fused_experts_of(owner, f"{layer_name}.{sub_name}") if sub_name else None
            if experts is not None and leaf in (experts.up, experts.down):
                done = expert_slices.get((id(owner), leaf), 0)
                if done == experts.num_experts:
                    plan.entries.append(CoverageEntry(full, shape, PRUNED))
                elif done:
                    reason = f"ignored: {experts.num_experts - done} of {experts.num_experts} experts"
                    plan.entries.append(CoverageEntry(full, shape, PRUNED, reason))
                else:
                    plan.entries.append(CoverageEntry(full, shape, DENSE, "ignored"))
                continue
            reason = _dense_reason(layer, sub_name, owner, leaf, full, ignore, experts is not None)
            if reason is None and _element_wise(owner, leaf, param):
                reason = "element-wise"
            if reason is None:
                plan.entries.append(CoverageEntry(full, shape, UNREACHABLE, _unreachable_reason(owner, leaf)))
            else:
                plan.entries.append(CoverageEntry(full, shape, DENSE, reason))
    return plan


def _dense_reason(
    layer: nn.Module,
    sub_name: str,
    owner: nn.Module,
    leaf: str,
    full: str,
    ignore: list[str],
    in_experts: bool,
) -> str | None:
    # Patterns name modules as in the plain model (without peft's ``base_layer``).
    module_name = canonical_name(full.rpartition(".")[0])
    if matches_pattern(canonical_name(full), ignore) or matches_pattern(module_name, ignore):
        return "ignored"
    if "lora_" in full or type(owner).__module__.startswith("peft"):
        return "adapter"
    if sub_name and is_router(sub_name, owner, ancestors_of(layer, sub_name)):
        return "router"
    if in_experts and leaf.endswith("_bias"):
        return "expert bias"
    if isinstance(owner, nn.Embedding) or any(part in sub_name.split(".") for part in ALWAYS_DENSE):
        return "embedding"
    if isinstance(owner, nn.modules.conv._ConvNd):
        return "conv"
    if "norm" in type(owner).__name__.lower() or "norm" in sub_name.rpartition(".")[2].lower():
        return "norm"
    return None


def _element_wise(owner: nn.Module, leaf: str, param) -> bool:
    """A parameter the model uses element-wise, not as a linear map: a learned vector stored with unit
    dimensions (a ``[1, 1, H]`` memory token) or a state-space model's state matrix ``A_log``."""
    return not is_prunable_linear(owner) and (matrix_rank(param) < 2 or leaf == "A_log")


def _unreachable_reason(owner: nn.Module, leaf: str) -> str:
    kind = type(owner).__name__
    if is_prunable_linear(owner):
        return f"{kind}.{leaf} is not a weight the method prunes"
    return (
        f"{kind}.{leaf} is neither an nn.Linear weight nor a transformers fused-experts tensor "
        "(use_experts_implementation), so no statistics can reach it"
    )
