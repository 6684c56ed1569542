"""Forward pre-hooks that feed a layer's linear-module inputs into running statistics.

The hooks only move tensors: they drop padding tokens, tag each token with its language and hand the rows
to a statistics object from ``parts.statistics``. Modules that read the very same input tensor (q/k/v,
gate/up) are detected at run time and share one statistic, so it is computed once. The experts of fused
mixture-of-experts modules get one statistic per expert and projection, fed by ``experts.ExpertsRecorder``
from the tokens routed to that expert.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from .. import distributed
from .experts import (
    ExpertList,
    ExpertOptions,
    ExpertsRecorder,
    ExpertsStatistics,
    ExpertWeight,
    RoutingCounts,
    TokenMatcher,
)
from .linear import ListedExpertLinear, PrunableLinear


class StopLayerForward(Exception):
    """Raised by the last module's hook: the rest of the layer's forward pass is not needed."""


class LayerStatisticsCollector:
    """Collects input statistics for the prunable modules of one decoder layer.

    Args:
        modules: the layer's prunable linear modules and expert weights (:class:`ExpertWeight`).
        new_statistic: ``(in_features, device) -> statistic`` with an ``update(x, language)`` method.
        new_negative_statistic: same, for negative-calibration batches (optional).
        num_languages: calibration languages (for the routing counts of experts).
        expert_options: how experts are calibrated.
        new_expert_statistic: ``(in_features, device) -> statistic`` for one expert's projection (fused
            experts), ``new_statistic`` when not given.
    """

    def __init__(
        self,
        modules: list[PrunableLinear | ExpertWeight],
        new_statistic: Callable[[int, torch.device], Any],
        new_negative_statistic: Callable[[int, torch.device], Any] | None = None,
        num_languages: int = 1,
        expert_options: ExpertOptions | None = None,
        new_expert_statistic: Callable[[int, torch.device], Any] | None = None,
    ):
        self.modules = [m for m in modules if not isinstance(m, ExpertWeight)]
        self.expert_weights = [m for m in modules if isinstance(m, ExpertWeight)]
        self.new_statistic = new_statistic
        self.new_expert_statistic = new_expert_statistic or new_statistic
        self.new_negative_statistic = new_negative_statistic
        self.expert_options = expert_options or ExpertOptions()
        self.group_of: dict[str, int] = {}
        self.statistics: list[Any] = []
        self.negative_statistics: list[Any] = []
        # Expert statistics come first, one group per expert weight, allocated now (their layout is known).
        self.experts = self._allocate_expert_statistics(num_languages)
        # Experts that are modules of nn.Linear: their linear hooks see the tokens routed to them, matched to
        # the MoE block's input.
        self.expert_lists: dict[str, ExpertList] = {}
        for m in self.modules:
            if isinstance(m, ListedExpertLinear) and m.expert_list is not None:
                self.expert_lists.setdefault(m.expert_list.name, m.expert_list)
        self._list_routing = {
            name: RoutingCounts(num_languages, lst.num_experts) for name, lst in self.expert_lists.items()
        }
        self._list_fallback = {name: [False] * lst.num_experts for name, lst in self.expert_lists.items()}
        self._matchers = {name: TokenMatcher() for name in self.expert_lists}
        self._list_tokens: dict[str, torch.Tensor] = {}
        self._running_fallback = False
        self._fixed_groups = len(self.statistics)
        self._seq_len = 1
        self._saw_batch = False
        self._fallback_pass = False
        self._fallback_last: str | None = None
        self._valid: torch.Tensor | None = None
        self._all_valid = True
        self._language: torch.Tensor | None = None
        self._negative = False
        self._seen: dict[tuple, int] = {}
        self._alive: list[torch.Tensor] = []
        # Order in which the modules ran on the first batch; once known, the pass over later batches stops
        # right after the last module's input is recorded (its matmul and the rest of the layer are skipped).
        self._order: list[str] = []
        self._order_known = False
        self._stop_early = False

    def _allocate_expert_statistics(self, num_languages: int) -> list[ExpertsStatistics]:
        owners: dict[str, ExpertsStatistics] = {}
        for weight in self.expert_weights:
            owner = weight.owner
            if owner.name not in owners:
                n = owner.num_experts
                negative = self.new_negative_statistic is not None
                owners[owner.name] = ExpertsStatistics(
                    owner,
                    [None] * n,
                    [None] * n,
                    [None] * n if negative else [],
                    [None] * n if negative else [],
                    RoutingCounts(num_languages, n, device=weight.device),
                    [False] * n,
                )
            stats = owners[owner.name]
            up = weight.parameter == owner.up
            self.group_of[weight.name] = len(self.statistics)
            statistic = self.new_expert_statistic(weight.in_features, weight.device)
            self.statistics.append(statistic)
            (stats.up if up else stats.down)[weight.expert] = statistic
            if self.new_negative_statistic is not None:
                negative_statistic = self.new_negative_statistic(weight.in_features, weight.device)
                self.negative_statistics.append(negative_statistic)
                (stats.negative_up if up else stats.negative_down)[weight.expert] = negative_statistic
        return list(owners.values())

    @property
    def groups(self) -> list[list[PrunableLinear]]:
        """Modules grouped by shared input, in order of first use (each expert weight alone, first)."""
        grouped: list[list[PrunableLinear]] = [[] for _ in self.statistics]
        for module in [*self.expert_weights, *self.modules]:
            if module.name in self.group_of:
                grouped[self.group_of[module.name]].append(module)
        return grouped

    def layout(self) -> list[tuple[list[str], int]]:
        """The shared-input groups found so far as ``[(module names, in_features)]``, in group order (empty
        before the first batch, even with the expert groups allocated up front)."""
        if not self._saw_batch:
            return []
        return [([m.name for m in group], group[0].in_features) for group in self.groups]

    def adopt_layout(self, layout: list[tuple[list[str], int]]) -> None:
        """Give this collector the groups ``layout`` describes, with empty statistics where it saw no batch.

        Used by data-parallel runs: a process whose shard held no calibration sequence never ran its hooks,
        yet must take part in summing the statistics. A collector that did see batches must have found the
        very same groups.
        """
        fixed = self._fixed_groups
        own = [([m.name for m in group], group[0].in_features) for group in self.groups]
        if own[:fixed] != layout[:fixed]:
            raise RuntimeError("expert weights differ between processes")
        if self._saw_batch:
            if self.layout() != layout:
                raise RuntimeError(
                    f"shared-input groups differ between processes: {self.layout()} here, {layout} elsewhere"
                )
            return
        by_name = {m.name: m for m in self.modules}
        for names, in_features in layout[fixed:]:
            index = len(self.statistics)
            for name in names:
                self.group_of[name] = index
            device = by_name[names[0]].device
            self.statistics.append(self.new_statistic(in_features, device))
            if self.new_negative_statistic is not None:
                self.negative_statistics.append(self.new_negative_statistic(in_features, device))

    def set_batch(
        self, attention_mask: torch.Tensor, language_per_sequence: torch.Tensor, negative: bool = False
    ):
        """Declare the batch about to run: its padding mask ``[b, L]`` and sequence languages ``[b]``."""
        seq_len = attention_mask.shape[1]
        self._seq_len = seq_len
        self._saw_batch = True
        self._valid = attention_mask.reshape(-1).bool()
        # Boolean selection copies every row: skip it when the batch has no padding (the common case).
        self._all_valid = bool(self._valid.all())
        self._language = language_per_sequence.repeat_interleave(seq_len)
        self._sequence_language = language_per_sequence
        self._sequences = attention_mask.shape[0]
        self._negative = negative
        self._seen.clear()
        self._alive.clear()

    def end_batch(self) -> None:
        self._seen.clear()
        self._alive.clear()
        if self._order and not self._order_known:
            self._order_known = True

    def _hook(self, module: PrunableLinear):
        listed = module if isinstance(module, ListedExpertLinear) else None

        def pre_hook(_module, args, kwargs):
            if self._fallback_pass:  # only the experts under their token threshold are calibrated again
                if listed is None or not self._running_fallback:
                    return None
                if not self._list_fallback[listed.expert_list.name][listed.expert]:
                    return None
            if not self._order_known:
                self._order.append(module.name)
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device)
            if key in self._seen:
                self.group_of.setdefault(module.name, self._seen[key])
                self._maybe_stop(module)
                return None
            # Keep the tensor alive for the rest of the layer call so its address cannot be reused.
            self._alive.append(x)
            if module.name not in self.group_of:
                self.group_of[module.name] = len(self.statistics)
                device = x.device
                factory = self.new_statistic if listed is None else self.new_expert_statistic
                self.statistics.append(factory(module.in_features, device))
                if self.new_negative_statistic is not None:
                    self.negative_statistics.append(self.new_negative_statistic(module.in_features, device))
            group = self.group_of[module.name]
            self._seen[key] = group
            if listed is not None:
                self._update_listed(group, x, self._list_tokens[listed.expert_list.name], module.name)
            else:
                self._update(group, x)
            self._maybe_stop(module)
            return None

        return pre_hook

    def _maybe_stop(self, module: PrunableLinear) -> None:
        if self._fallback_pass:
            return
        if self._stop_early and self._order_known and module.name == self._order[-1]:
            raise StopLayerForward

    # -- experts that are lists of modules --------------------------------------------------------------
    def _block_hook(self, expert_list: ExpertList):
        matcher = self._matchers[expert_list.name]

        def pre_hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            matcher.set_block_input(hidden)
            if not self._fallback_pass:
                return None
            flags = self._list_fallback[expert_list.name]
            tokens = torch.arange(matcher.hidden.shape[0], device=matcher.hidden.device)
            self._running_fallback = True
            try:
                for e, fell_back in enumerate(flags):
                    if fell_back:
                        self._list_tokens[expert_list.name] = tokens
                        self._seen.clear()
                        expert_list.experts[e](matcher.hidden)
            finally:
                self._running_fallback = False
            if self._stop_early and expert_list.name == self._fallback_last:
                raise StopLayerForward
            return None

        return pre_hook

    def _expert_hook(self, expert_list: ExpertList, index: int):
        matcher = self._matchers[expert_list.name]
        counts = self._list_routing[expert_list.name].counts

        def pre_hook(_module, args, kwargs):
            if self._running_fallback:
                return None
            x = args[0] if args else next(iter(kwargs.values()))
            tokens = matcher.tokens_of(x, expert_list.expert_name(index))
            self._list_tokens[expert_list.name] = tokens
            if not self._negative and not self._fallback_pass:
                valid = self._valid.to(tokens.device)[tokens]
                language = self._language.to(tokens.device)[tokens][valid]
                counts[:, index] += torch.bincount(language, minlength=counts.shape[0]).to(counts)
            return None

        return pre_hook

    def _update_listed(self, group: int, x: torch.Tensor, tokens: torch.Tensor, name: str) -> None:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] != tokens.numel():
            raise RuntimeError(
                f"{name} saw {rows.shape[0]} rows for the {tokens.numel()} tokens of its expert"
            )
        # In token order, padding dropped: the statistic sums one sequence at a time.
        order = torch.argsort(tokens, stable=True)
        tokens = tokens[order]
        keep = self._valid.to(tokens.device)[tokens]
        tokens, rows = tokens[keep], rows[order][keep]
        language = self._language.to(tokens.device)[tokens]
        if self._negative:
            self.negative_statistics[group].update(rows, torch.zeros_like(language))
            return
        batch = self._valid.numel() // self._seq_len
        lengths = torch.bincount(tokens // self._seq_len, minlength=batch).tolist()
        self.statistics[group].update(rows, language, lengths)

    def _experts_called(self, name: str) -> None:
        """An experts module has recorded its statistics. Stopping is left to its forward hook
        (:meth:`_stop_after_experts`): raised inside the forward, the exception would skip Accelerate's
        post-forward and leave offloaded expert weights materialised."""
        if self._fallback_pass:
            self._stop_pending = self._stop_early and name == self._fallback_last
            return
        if not self._order_known:
            self._order.append(name)
        self._stop_pending = self._stop_early and self._order_known and name == self._order[-1]

    def _stop_after_experts(self, _module, _args, _output) -> None:
        if self._stop_pending:
            self._stop_pending = False
            raise StopLayerForward

    def _token_context(self) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        return self._valid, self._language, self._seq_len, self._negative

    def run(self, forward: Callable[..., Any], *args: Any) -> None:
        """Call ``forward(*args)`` for statistics only: its output is not needed, so the call is cut short
        right after the last module's input has been recorded (from the second batch on)."""
        self._stop_early = True
        try:
            forward(*args)
        except StopLayerForward:
            pass
        finally:
            self._stop_early = False

    def _update(self, group: int, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        valid, language = self._valid, self._language
        if rows.shape[0] != valid.shape[0]:
            valid, language = self._rows_of_other_length(rows, x)
        language = language.to(rows.device)
        if valid is not None and not self._all_valid:
            valid = valid.to(rows.device)
            rows, language = rows[valid], language[valid]
        if self._negative:
            self.negative_statistics[group].update(rows, torch.zeros_like(language))
        else:
            # Tell the statistic where each sequence's tokens start and end, so that it can sum its float32
            # products one sequence at a time (the same whichever batch or rank a sequence lands in).
            if x.dim() < 3 or valid is None:
                lengths = None
            elif self._all_valid:
                lengths = x.shape[-2]
            else:
                lengths = self._valid.view(-1, x.shape[-2]).sum(dim=1).tolist()
            self.statistics[group].update(rows, language, lengths)

    def _rows_of_other_length(
        self, rows: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Languages of the rows of a module that sees another number of token positions than the batch has
        (a layer that prepends memory tokens or merges positions): kept when the sequences are unpadded and
        the rows still split per sequence; ``None`` for the padding mask (nothing to drop)."""
        batch = self._sequences
        if not self._all_valid or x.dim() < 3 or x.shape[0] != batch or rows.shape[0] % batch:
            fewer = rows.shape[0] < self._valid.shape[0]
            raise RuntimeError(
                f"a linear module saw {rows.shape[0]} token rows for a batch of {self._valid.shape[0]} tokens: "
                + (
                    "it sees a subset of the tokens (an expert fed only the tokens routed to it)"
                    if fewer
                    else "the layer adds token positions (memory or prompt tokens, n-gram streams)"
                )
                + ", so the batch's padding and languages cannot be mapped onto its rows"
                + ("" if self._all_valid or fewer else ": calibrate on unpadded (equal-length) sequences")
            )
        per_sequence = rows.shape[0] // batch
        return None, self._sequence_language.repeat_interleave(per_sequence)

    @contextmanager
    def attached(self):
        handles = [m.module.register_forward_pre_hook(self._hook(m), with_kwargs=True) for m in self.modules]
        recorder = ExpertsRecorder(
            self.experts, self.expert_options, self._token_context, self._experts_called
        )
        if self._fallback_pass:
            recorder.fallback_only = {
                s.experts.name: [e for e, f in enumerate(s.fallback) if f] for s in self.experts
            }
        self._stop_pending = False
        for stats in self.experts:
            handles.append(stats.experts.module.register_forward_hook(self._stop_after_experts))
        for expert_list in self.expert_lists.values():
            handles.append(
                expert_list.block.register_forward_pre_hook(self._block_hook(expert_list), with_kwargs=True)
            )
            for e, expert in enumerate(expert_list.experts):
                handles.append(
                    expert.register_forward_pre_hook(self._expert_hook(expert_list, e), with_kwargs=True)
                )
        try:
            with recorder.attached():
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self.end_batch()

    def never_ran(self) -> list[PrunableLinear]:
        """The modules whose hook never fired: the layer's forward pass does not call them (cross-attention
        without encoder states) or reads their weight directly (Mamba's ``dt_proj``)."""
        # Experts are not here: one never routed to is calibrated by the fallback rule (see below).
        return [m for m in self.modules if type(m) is PrunableLinear and m.name not in self.group_of]

    # -- experts under their token threshold -------------------------------------------------------------
    def start_fallback_pass(self) -> bool:
        """After the statistics pass (and its data-parallel sum): sum the routing counts over ranks, mark the
        experts routed fewer than ``expert_options.min_tokens`` tokens, give them fresh statistics and
        return whether a second pass is needed (run it like the first, over the main batches only, then
        call :meth:`end_fallback_pass`)."""
        if not self.experts and not self.expert_lists:
            return False
        distributed.all_reduce_statistics([s.routing for s in self.experts])
        distributed.all_reduce_statistics(list(self._list_routing.values()))
        if self.expert_options.calibrate_all_experts:
            return False
        fresh = []
        for name, routing in self._list_routing.items():
            for e, tokens in enumerate(routing.per_expert.tolist()):
                if tokens >= self.expert_options.min_tokens:
                    continue
                self._list_fallback[name][e] = True
                for module in self.modules:
                    listed = isinstance(module, ListedExpertLinear) and module.expert_list.name == name
                    if listed and module.expert == e and module.name in self.group_of:
                        group = self.group_of[module.name]
                        if all(self.statistics[group] is not f for f in fresh):
                            statistic = self.new_expert_statistic(module.in_features, module.device)
                            self.statistics[group] = statistic
                            fresh.append(self.statistics[group])
        for stats in self.experts:
            tokens = stats.routing.per_expert
            for e in range(stats.experts.num_experts):
                if tokens[e] >= self.expert_options.min_tokens:
                    continue
                stats.fallback[e] = True
                for kind, parameter in (("up", stats.experts.up), ("down", stats.experts.down)):
                    old = getattr(stats, kind)[e]
                    if old is None:
                        continue
                    weight = stats.experts.weight(parameter, e)
                    new = self.new_expert_statistic(weight.in_features, weight.device)
                    getattr(stats, kind)[e] = new
                    self.statistics[self.group_of[weight.name]] = new
                    fresh.append(new)
        self._fresh = fresh
        if not any(any(s.fallback) for s in self.experts) and not any(map(any, self._list_fallback.values())):
            return False
        self._fallback_pass = True
        # The last module (in forward order) whose fallback experts run: the pass stops right after it.
        candidates = [s.experts.name for s in self.experts if any(s.fallback)]
        candidates += [name for name, flags in self._list_fallback.items() if any(flags)]

        def position(name: str) -> int:  # a fused module's own name, or the last linear of a list's experts
            return max(
                (i for i, n in enumerate(self._order) if n == name or n.startswith(f"{name}.")), default=-1
            )

        self._fallback_last = max(candidates, key=position)
        return True

    def end_fallback_pass(self) -> None:
        self._fallback_pass = False
        distributed.all_reduce_statistics(self._fresh)
        self._fresh = []

    def expert_records(self, languages: list[str]) -> dict[str, dict[str, Any]]:
        """Per experts module: routed tokens and fallback flag per expert, and each calibration language's
        share of routed tokens per expert (read after :meth:`start_fallback_pass`)."""
        records = {}
        for stats in self.experts:
            shares = stats.routing.shares().cpu()
            records[stats.experts.name] = {
                "num_experts": stats.experts.num_experts,
                "tokens": [int(t) for t in stats.routing.per_expert.tolist()],
                "fallback": list(stats.fallback),
                "routing_shares": {
                    language: [round(float(v), 6) for v in shares[i].tolist()]
                    for i, language in enumerate(languages)
                },
            }
        for name, routing in self._list_routing.items():
            shares = routing.shares().cpu()
            records[name] = {
                "num_experts": self.expert_lists[name].num_experts,
                "tokens": [int(t) for t in routing.per_expert.tolist()],
                "fallback": list(self._list_fallback[name]),
                "routing_shares": {
                    language: [round(float(v), 6) for v in shares[i].tolist()]
                    for i, language in enumerate(languages)
                },
            }
        return records

    def statistic_for(self, module: PrunableLinear) -> Any:
        if module.name not in self.group_of:
            raise RuntimeError(
                f"{module.name} never ran during calibration: it is unused by this model's forward pass"
            )
        return self.statistics[self.group_of[module.name]]

    def negative_statistic_for(self, module: PrunableLinear) -> Any:
        return self.negative_statistics[self.group_of[module.name]]

    def synchronise(self) -> int:
        """Data-parallel runs: give every rank the same shared-input groups, then add every statistic's raw
        sums (``raw_sums`` / ``load_raw_sums``) over all ranks. Returns the bytes all-reduced (0 in a single
        process, where nothing happens). A rank whose shard held no sequence adopts the others' groups."""
        if not distributed.current_context().enabled:
            return 0
        self.adopt_layout(
            distributed.agree_on_layout(self.layout(), what="shared-input groups of a decoder layer")
        )
        return distributed.all_reduce_statistics([*self.statistics, *self.negative_statistics])
