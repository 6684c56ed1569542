"""Mixture-of-experts layers: fused expert tensors as per-expert ``[out, in]`` weights, routers, and the
per-expert calibration statistics.

transformers 5 stores the experts of a layer as 3-D parameters (``gate_up_proj`` ``[E, 2I, H]`` and
``down_proj`` ``[E, H, I]``, or transposed ``[E, H, 2I]`` / ``[E, I, H]``) in a module decorated by
``transformers.integrations.moe.use_experts_implementation``, which also records the layout on the module
(``has_gate``, ``has_bias``, ``is_transposed``) and gives it ``_apply_gate`` (or ``act_fn``). Every such
module is called as ``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``.

During the statistics pass the experts' forward is replaced by a per-expert ("linearized") loop that
computes what the module computes, expert by expert on the tokens routed to it, and hands each expert's
inputs to that expert's own running statistics. The first batch of every layer is checked against the
module's own forward: a layout this code does not reproduce is a clear error, never wrong statistics.
Nothing outside this module knows how experts are fused.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .offload import execution_device, read_parameter, write_parameter

# The names transformers (and remote code) give router classes and routing attributes: a module of a
# decoder layer that matches one of them, or sits inside one, is a router or a gate.
_ROUTER_CLASS = re.compile(r"Router|Gating|Gate$")
_ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "gating", "switch", "wg")


@dataclass(frozen=True)
class ExpertOptions:
    """How experts are calibrated (mixture-of-experts models only; ignored for dense models).

    Attributes:
        router_weighted: statistics of an expert read its inputs scaled by the router weight of each token
            (``w * x``): the expert's contribution to the block output is ``w * expert(x)``, so the
            quadratic statistics (norms, Hessians) are those of that contribution. ``False`` (default):
            plain ``x``, which measured as good or slightly better (``docs/moe.md``). Fused experts only.
        calibrate_all_experts: every expert's statistics see every calibration token (as if routed to all
            experts); the layer's output still uses the real routing.
        min_tokens: an expert routed fewer calibration tokens than this (all languages, all ranks) falls
            back to being calibrated on every token entering its MoE block (unweighted), collected in a
            second pass over that layer; recorded per expert in the report.
    """

    router_weighted: bool = False
    calibrate_all_experts: bool = False
    min_tokens: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.router_weighted, bool) or not isinstance(self.calibrate_all_experts, bool):
            raise TypeError("router_weighted and calibrate_all_experts must be booleans")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "router_weighted": self.router_weighted,
            "calibrate_all_experts": self.calibrate_all_experts,
            "min_tokens": self.min_tokens,
        }


#: the stated rule for experts under ``min_tokens`` (also shown on the model card)
FALLBACK_RULE = (
    "calibrated on every token entering its MoE block (unweighted), in a second pass over the layer"
)


# -- layout -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedExperts:
    """One module holding the experts of a MoE layer as 3-D parameters.

    Attributes:
        name: its full module name.
        module: the module.
        up: the first projection's parameter (``gate_up_proj`` when gated, else ``up_proj``).
        down: the second projection's parameter (``down_proj``).
        has_gate, has_bias, transposed: the layout ``use_experts_implementation`` records.
    """

    name: str
    module: nn.Module
    up: str
    down: str
    has_gate: bool
    has_bias: bool
    transposed: bool

    @property
    def num_experts(self) -> int:
        return int(getattr(self.module, self.down).shape[0])

    def weight(self, parameter: str, expert: int) -> ExpertWeight:
        return ExpertWeight(f"{self.name}.{parameter}[{expert}]", self, parameter, expert)

    def weights(self) -> list[ExpertWeight]:
        """Every expert's two weights, up projections first (the order statistics are kept in)."""
        return [self.weight(p, e) for p in (self.up, self.down) for e in range(self.num_experts)]


def fused_experts_of(module: nn.Module, name: str) -> FusedExperts | None:
    """The layout of ``module`` when it is a transformers 5 fused-experts module, else ``None``."""
    if not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed")):
        return None
    up = "gate_up_proj" if module.has_gate else "up_proj"
    params = dict(module.named_parameters(recurse=False))
    if params.get(up) is None or params.get("down_proj") is None:
        return None
    if params[up].dim() != 3 or params["down_proj"].dim() != 3:
        return None
    return FusedExperts(
        name,
        module,
        up,
        "down_proj",
        bool(module.has_gate),
        bool(module.has_bias),
        bool(module.is_transposed),
    )


def find_fused_experts(layer: nn.Module, layer_name: str) -> list[FusedExperts]:
    """The fused-experts modules inside a decoder layer, in module order."""
    found = []
    for sub_name, module in layer.named_modules():
        experts = fused_experts_of(module, f"{layer_name}.{sub_name}") if sub_name else None
        if experts is not None:
            found.append(experts)
    return found


def is_router(sub_name: str, module: nn.Module, ancestors: list[nn.Module]) -> bool:
    """Whether a module of a decoder layer (``sub_name`` relative to the layer) is a MoE router or part of one.

    A router is a module whose own class is a router/gating class, a module inside an enclosing ``*Router``
    class, or a module an MoE block keeps under a router's attribute name (``gate``, ``router``,
    ``shared_expert_gate``, ...) next to its experts, and anything inside it (routers that are small MLPs).
    An enclosing class named ``*Gating*`` or ``*Gate`` alone is not enough: gated MLPs (Moshi's
    ``MoshiGatingMLP``) and gates of attention (Kimi's forget gate) are ordinary weights to prune.
    """
    if _ROUTER_CLASS.search(type(module).__name__):
        return True
    if any("Router" in type(a).__name__ for a in ancestors):
        return True
    parts = sub_name.split(".")
    chain = [*reversed(ancestors), module]  # the module at parts[: i + 1] is chain[i]
    for i in range(1, len(parts)):
        if parts[i] in _ROUTER_NAMES and any("expert" in name for name, _ in chain[i - 1].named_children()):
            return True
    return False


@dataclass
class ExpertWeight:
    """One expert's matrix inside a fused 3-D parameter, read and written as ``[out, in]``.

    Quacks like :class:`~optimum_mwanda.modeling.PrunableLinear` for the walk, the resume checkpoint and
    verification: ``name``, ``shape``, ``in_features``, ``device``, ``read_weight``, ``write_weight``.
    """

    name: str
    owner: FusedExperts = field(repr=False)
    parameter: str
    expert: int

    @property
    def module(self) -> nn.Module:
        return self.owner.module

    @property
    def transposed(self) -> bool:
        return self.owner.transposed

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = getattr(self.module, self.parameter).shape[1:]
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return execution_device(self.module)

    def read_weight(self) -> torch.Tensor:
        weight = read_parameter(self.module, self.parameter)[self.expert]
        return weight.t() if self.transposed else weight

    def write_weight(self, weight: torch.Tensor) -> None:
        value = weight.t() if self.transposed else weight
        param = getattr(self.module, self.parameter)
        if param.device.type != "meta":
            with torch.no_grad():
                param.data[self.expert].copy_(value.to(device=param.device, dtype=param.dtype))
            return
        # Offloaded: the store holds the whole 3-D tensor; rewrite it with this expert replaced.
        full = read_parameter(self.module, self.parameter).clone()
        full[self.expert] = value.to(device=full.device, dtype=full.dtype)
        write_parameter(self.module, self.parameter, full)


# -- statistics --------------------------------------------------------------------------------------------
class RoutingCounts:
    """Per-language count of (valid, non-negative) calibration tokens routed to each expert: ``[L, E]``.

    A statistic in the ``raw_sums`` sense, so data-parallel ranks add theirs with the linear statistics.
    """

    def __init__(self, num_languages: int, num_experts: int, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(num_languages, num_experts, dtype=torch.float64, device=device)

    def raw_sums(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load_raw_sums(self, sums: dict[str, torch.Tensor]) -> None:
        self.counts.copy_(sums["counts"])

    @property
    def per_expert(self) -> torch.Tensor:
        return self.counts.sum(dim=0)

    def shares(self) -> torch.Tensor:
        """``[L, E]``: each language's routed token-expert assignments divided among the experts (rows sum
        to 1; zeros for a language with no tokens)."""
        total = self.counts.sum(dim=1, keepdim=True)
        return torch.where(total > 0, self.counts / total.clamp_min(1.0), torch.zeros_like(self.counts))


@dataclass
class ExpertsStatistics:
    """Statistics of one fused-experts module for one layer's pass.

    ``up[e]`` / ``down[e]`` read the inputs of expert ``e``'s first and second projection;
    ``negative_up`` / ``negative_down`` the same for negative-calibration batches (empty when none).
    """

    experts: FusedExperts
    up: list[Any]
    down: list[Any]
    negative_up: list[Any]
    negative_down: list[Any]
    routing: RoutingCounts
    fallback: list[bool] = field(default_factory=list)


class ExpertsRecorder:
    """Replaces the forward of fused-experts modules with a per-expert loop that feeds statistics.

    Args:
        statistics: one :class:`ExpertsStatistics` per fused-experts module of the layer.
        options: how to calibrate.
        token_context: ``() -> (valid [T] bool, language [T] long, sequence length, negative)`` of the
            current batch (flattened ``b * L`` tokens, as MoE blocks flatten them).
        on_call: ``(name) -> None`` after an experts module's statistics are recorded (for stopping the
            layer's forward early), called before its output is computed.
    """

    def __init__(
        self,
        statistics: list[ExpertsStatistics],
        options: ExpertOptions,
        token_context: Callable[[], tuple[torch.Tensor, torch.Tensor, int, bool]],
        on_call: Callable[[str], None],
    ):
        self.statistics = statistics
        self.options = options
        self.token_context = token_context
        self.on_call = on_call
        #: experts to calibrate on every token (second pass): ``{module name: [expert indices]}``; when set,
        #: no other statistic is updated
        self.fallback_only: dict[str, list[int]] | None = None
        self._checked: set[str] = set()

    @contextmanager
    def attached(self):
        patched = []
        try:
            for stats in self.statistics:
                module = stats.experts.module
                # Inside Accelerate's wrapper (it calls ``_old_forward`` once the weights are in place).
                attribute = (
                    "_old_forward"
                    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")
                    else "forward"
                )
                had_own = attribute in module.__dict__
                original = getattr(module, attribute)
                setattr(module, attribute, self._forward(stats, original))
                patched.append((module, attribute, had_own, original))
            yield self
        finally:
            for module, attribute, had_own, original in reversed(patched):
                if had_own:
                    setattr(module, attribute, original)
                else:
                    delattr(module, attribute)

    def _forward(self, stats: ExpertsStatistics, original: Callable[..., torch.Tensor]):
        def forward(hidden_states, top_k_index=None, top_k_weights=None, *args, **kwargs):
            if args or kwargs or top_k_index is None or top_k_weights is None:
                raise RuntimeError(
                    f"{stats.experts.name} ({type(stats.experts.module).__name__}) was called in an unexpected "
                    "way for a transformers fused-experts module (hidden_states, top_k_index, top_k_weights)"
                )
            output = self._record(stats, hidden_states, top_k_index, top_k_weights)
            if stats.experts.name not in self._checked and self.fallback_only is None:
                self._checked.add(stats.experts.name)
                _check_same(stats.experts, output, original(hidden_states, top_k_index, top_k_weights))
            return output

        return forward

    def _record(
        self,
        stats: ExpertsStatistics,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        experts = stats.experts
        module = experts.module
        valid, language, seq_len, negative = self.token_context()
        tokens = hidden_states.shape[0]
        if hidden_states.dim() != 2 or tokens != valid.numel():
            raise RuntimeError(
                f"{experts.name} received {tuple(hidden_states.shape)} hidden states for a batch of "
                f"{valid.numel()} tokens: this MoE block does not route the layer's tokens one by one"
            )
        device = hidden_states.device
        valid, language = valid.to(device), language.to(device)
        fallback = None if self.fallback_only is None else set(self.fallback_only.get(experts.name, []))
        if fallback is not None and not fallback:
            return self._finish(experts, hidden_states, top_k_index, top_k_weights)
        all_tokens = torch.arange(tokens, device=device)
        if not negative and fallback is None:
            counts = stats.routing.counts
            routed = valid.unsqueeze(1).expand_as(top_k_index) & (top_k_index < experts.num_experts)
            index = top_k_index[routed].long()  # expert-parallel sentinels (>= E) route nowhere
            lang = language.unsqueeze(1).expand_as(top_k_index)[routed]
            flat = counts.new_zeros(counts.numel())
            flat.index_add_(
                0, (lang * experts.num_experts + index).to(counts.device), counts.new_ones(index.numel())
            )
            counts += flat.view_as(counts)
        up_w, down_w = getattr(module, experts.up), getattr(module, experts.down)
        up_b = getattr(module, f"{experts.up}_bias") if experts.has_bias else None
        down_b = getattr(module, f"{experts.down}_bias") if experts.has_bias else None
        output = torch.zeros_like(hidden_states)
        for e in range(experts.num_experts):
            if fallback is not None and e not in fallback:
                continue
            token_idx, position = (top_k_index == e).nonzero(as_tuple=True)
            if token_idx.numel() == 0 and fallback is None and not self.options.calibrate_all_experts:
                continue
            everyone = fallback is not None or self.options.calibrate_all_experts
            rows = all_tokens if everyone else token_idx
            x = hidden_states[rows]
            h = _linear(x, up_w[e], None if up_b is None else up_b[e], experts.transposed)
            h = module._apply_gate(h) if experts.has_gate else module.act_fn(h)
            keep = valid[rows]
            scale = None
            if not everyone and self.options.router_weighted:
                scale = top_k_weights[token_idx, position].to(torch.float32)[keep].unsqueeze(1)
            x_rows, h_rows = x[keep].float(), h[keep].float()
            if scale is not None:
                x_rows, h_rows = x_rows * scale, h_rows * scale
            kept = rows[keep]
            lang = language[kept]
            # Rows are in token order: tell the statistic where each sequence's tokens are.
            lengths = torch.bincount(kept // seq_len, minlength=tokens // seq_len).tolist()
            if negative:
                up_stat, down_stat = _get(stats.negative_up, e), _get(stats.negative_down, e)
                lang, lengths = torch.zeros_like(lang), None
            else:
                up_stat, down_stat = stats.up[e], stats.down[e]
            if up_stat is not None:
                up_stat.update(x_rows, lang, lengths)
            if down_stat is not None:
                down_stat.update(h_rows, lang, lengths)
            if fallback is not None:
                continue
            y = _linear(h, down_w[e], None if down_b is None else down_b[e], experts.transposed)
            if getattr(module, "has_post_expert_norm", False):
                y = module.post_expert_norm(y)
            if everyone:  # computed on every token: the block output takes the routed ones
                y = y[token_idx]
            output.index_add_(0, token_idx, (y * top_k_weights[token_idx, position, None]).to(output.dtype))
        self.on_call(experts.name)
        if fallback is not None:
            return self._finish(experts, hidden_states, top_k_index, top_k_weights)
        return output

    def _finish(self, experts, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        """The block output through the module's own computation (statistics were taken on other rows)."""
        return type(experts.module).forward(experts.module, hidden_states, top_k_index, top_k_weights)


def _get(statistics: list[Any], index: int) -> Any:
    return statistics[index] if statistics else None


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    out = x @ weight if transposed else torch.nn.functional.linear(x, weight)
    return out + bias if bias is not None else out


def _check_same(experts: FusedExperts, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Refuse a layout whose per-expert loop does not reproduce the module's own output."""
    scale = theirs.float().abs().max().clamp_min(1e-6)
    error = float((ours.float() - theirs.float()).abs().max() / scale)
    tolerance = 1e-3 if theirs.dtype == torch.float32 else 3e-2
    if not error <= tolerance:
        raise RuntimeError(
            f"the per-expert computation of {experts.name} ({type(experts.module).__name__}) differs from the "
            f"module's own forward by {error:.2e} (relative): this experts layout is not supported"
        )


# -- experts as a list of modules of nn.Linear (older transformers versions, remote code) ---------------------
@dataclass(frozen=True)
class ExpertList:
    """An ``nn.ModuleList`` of expert modules built from ``nn.Linear`` layers, inside a MoE block that
    routes each token to some of them (``block(hidden_states)`` calls ``experts[e](hidden_states[tokens])``).

    Attributes:
        name: the full name of the list (``model.layers.0.block_sparse_moe.experts``).
        block: the module that holds the list and routes tokens to it.
        experts: the list.
    """

    name: str
    block: nn.Module
    experts: nn.ModuleList

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def expert_name(self, index: int) -> str:
        return f"{self.name}.{index}"


def find_expert_lists(layer: nn.Module, layer_name: str) -> list[ExpertList]:
    """Lists of two or more same-class expert modules holding linear layers, named ``*expert*``."""
    found = []
    for sub_name, module in layer.named_modules():
        if not sub_name or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if "expert" not in sub_name.rsplit(".", 1)[-1] or len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        parent_name = sub_name.rpartition(".")[0]
        parent = layer.get_submodule(parent_name) if parent_name else layer
        found.append(ExpertList(f"{layer_name}.{sub_name}", parent, module))
    return found


def row_keys(rows: torch.Tensor) -> torch.Tensor:
    """An exact integer key per row of ``rows`` (``[n, d]``): its bits times fixed odd multipliers, summed
    in int64 (wrapping), so identical rows get identical keys whatever the matrix they sit in."""
    bits = rows.contiguous()
    bits = bits.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()]).long()
    generator = torch.Generator().manual_seed(0)
    multipliers = torch.randint(1, 2**62, (rows.shape[-1],), generator=generator, dtype=torch.int64) | 1
    return (bits * multipliers.to(bits.device)).sum(dim=-1)


class TokenMatcher:
    """Which tokens of a MoE block's input an expert received: its input rows matched, bit for bit, to
    the rows of the block's input (recorded by the block's pre-hook)."""

    def __init__(self) -> None:
        self._sorted: torch.Tensor | None = None
        self._order: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None

    def set_block_input(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden.reshape(-1, hidden.shape[-1])
        keys = row_keys(self.hidden)
        self._sorted, self._order = torch.sort(keys)

    def tokens_of(self, rows: torch.Tensor, where: str) -> torch.Tensor:
        if self._sorted is None:
            raise RuntimeError(f"{where} ran before its MoE block: cannot tell which tokens it received")
        keys = row_keys(rows.reshape(-1, rows.shape[-1]))
        position = torch.searchsorted(self._sorted, keys).clamp_max(self._sorted.numel() - 1)
        if not torch.equal(self._sorted[position], keys):
            raise RuntimeError(
                f"{where} received rows that are not tokens of its MoE block's input: this expert layout "
                "transforms tokens before the experts and is not supported"
            )
        return self._order[position]
