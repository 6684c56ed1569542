"""Forward pre-hooks that feed a layer's linear-module inputs into running statistics.

The hooks only move tensors: they drop padding tokens, tag each token with its language and hand the rows
to a statistics object from ``parts.statistics``. Modules that read the very same input tensor (q/k/v,
gate/up) are detected at run time and share one statistic, so it is computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch

from .linear import PrunableLinear


class StopLayerForward(Exception):
    """Raised by the last module's hook: the rest of the layer's forward pass is not needed."""


class LayerStatisticsCollector:
    """Collects input statistics for the prunable modules of one decoder layer.

    Args:
        modules: the layer's prunable linear modules.
        new_statistic: ``(in_features, device) -> statistic`` with an ``update(x, language)`` method.
        new_negative_statistic: same, for negative-calibration batches (optional).
    """

    def __init__(
        self,
        modules: list[PrunableLinear],
        new_statistic: Callable[[int, torch.device], Any],
        new_negative_statistic: Callable[[int, torch.device], Any] | None = None,
    ):
        self.modules = modules
        self.new_statistic = new_statistic
        self.new_negative_statistic = new_negative_statistic
        self.group_of: dict[str, int] = {}
        self.statistics: list[Any] = []
        self.negative_statistics: list[Any] = []
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

    @property
    def groups(self) -> list[list[PrunableLinear]]:
        """Modules grouped by shared input, in order of first use."""
        grouped: list[list[PrunableLinear]] = [[] for _ in self.statistics]
        for module in self.modules:
            if module.name in self.group_of:
                grouped[self.group_of[module.name]].append(module)
        return grouped

    def layout(self) -> list[tuple[list[str], int]]:
        """The shared-input groups found so far as ``[(module names, in_features)]``, in group order."""
        return [([m.name for m in group], group[0].in_features) for group in self.groups]

    def adopt_layout(self, layout: list[tuple[list[str], int]]) -> None:
        """Give this collector the groups ``layout`` describes, with empty statistics where it saw no batch.

        Used by data-parallel runs: a process whose shard held no calibration sequence never ran its hooks,
        yet must take part in summing the statistics. A collector that did see batches must have found the
        very same groups.
        """
        if self.statistics:
            if self.layout() != layout:
                raise RuntimeError(
                    f"shared-input groups differ between processes: {self.layout()} here, {layout} elsewhere"
                )
            return
        by_name = {m.name: m for m in self.modules}
        for names, in_features in layout:
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
        def pre_hook(_module, args, kwargs):
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
                self.statistics.append(self.new_statistic(module.in_features, device))
                if self.new_negative_statistic is not None:
                    self.negative_statistics.append(self.new_negative_statistic(module.in_features, device))
            group = self.group_of[module.name]
            self._seen[key] = group
            self._update(group, x)
            self._maybe_stop(module)
            return None

        return pre_hook

    def _maybe_stop(self, module: PrunableLinear) -> None:
        if self._stop_early and self._order_known and module.name == self._order[-1]:
            raise StopLayerForward

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
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self.end_batch()

    def never_ran(self) -> list[PrunableLinear]:
        """The modules whose hook never fired: the layer's forward pass does not call them (cross-attention
        without encoder states) or reads their weight directly (Mamba's ``dt_proj``)."""
        return [m for m in self.modules if m.name not in self.group_of]

    def statistic_for(self, module: PrunableLinear) -> Any:
        if module.name not in self.group_of:
            raise RuntimeError(
                f"{module.name} never ran during calibration: it is unused by this model's forward pass"
            )
        return self.statistics[self.group_of[module.name]]

    def negative_statistic_for(self, module: PrunableLinear) -> Any:
        return self.negative_statistics[self.group_of[module.name]]
