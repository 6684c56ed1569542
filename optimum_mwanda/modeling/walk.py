"""The sequential walk: capture the first layer's inputs, then per decoder layer collect statistics, prune,
and propagate the calibration activations through the pruned layer to the next one.

Everything method-specific is asked of the :class:`~optimum_mwanda.methods.PruningAlgorithm`; the walk
owns the hooks, devices, the activation store and restore-on-failure. Its progress is one record,
:class:`WalkProgress`; persistence plugs in as a :class:`ProgressListener` (the resume checkpoint,
:class:`optimum_mwanda.resume.ResumeCheckpoint`), which the walk never imports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..parts.masks import mask_from_scores
from .activations import ActivationStore
from .capture import CapturedInputs, capture_layer_inputs
from .decoder import DecoderStack
from .experts import ExpertOptions
from .hooks import LayerStatisticsCollector
from .linear import PrunableLinear
from .offload import input_device

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..calibration import CalibrationSet
    from ..methods import PruningAlgorithm


@dataclass
class WalkProgress:
    """How far the walk is and what it did: the one progress record. Updated after every decoder layer,
    handed to the :class:`ProgressListener`, returned by :meth:`SequentialWalk.run`; the
    :class:`~optimum_mwanda.PruningReport` is built from it."""

    completed_layers: int = 0
    layer_sparsity: list[float] = field(default_factory=list)
    layerwise_signal: list[float] = field(default_factory=list)
    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    resumed_from_layer: int = 0
    #: per fused-experts module: routed tokens, fallback and routing shares per expert (see hooks)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    magnitude_pruned: list[str] = field(default_factory=list)


#: the former name of :class:`WalkProgress`
WalkResult = WalkProgress


class ProgressListener(Protocol):
    """What the walk tells persistence, and asks of it (the resume checkpoint implements it).

    :meth:`load_state` is asked first: the progress of an earlier run (``None``: none), checked against
    ``layout`` (per decoder layer, ``{module name: shape}``); then :meth:`load_layer` for each finished
    layer and :meth:`load_hidden` for the next layer's inputs (``None``: recompute them). A new run gets
    :meth:`save_progress` once the schedule is known; then per layer :meth:`save_layer` with its new weights
    and :meth:`save_progress` with the layer counted as completed (and the next layer's inputs, if kept).
    """

    def load_state(self, layout: Sequence[Mapping[str, Sequence[int]]]) -> WalkProgress | None: ...

    def load_layer(self, index: int) -> dict[str, torch.Tensor]: ...

    def load_hidden(self) -> list[torch.Tensor] | None: ...

    def save_layer(self, index: int, weights: dict[str, torch.Tensor]) -> None: ...

    def save_progress(self, progress: WalkProgress, hidden: list[torch.Tensor] | None) -> None: ...


class SequentialWalk:
    """Prunes a model's decoder layers one after another, in place.

    Args:
        model: the causal LM (in memory or dispatched by Accelerate).
        stack: its decoder layers.
        layer_modules: the prunable linear modules of every decoder layer.
        algorithm: what to collect and how to prune.
        checkpoint: the :class:`ProgressListener` that persists progress after every layer and resumes from
            it (the resume checkpoint; optional).
        activations_device: where calibration activations wait between layers (``None``: where produced).
        activations_max_memory: bytes of activations kept in memory before spilling to disk.
        show_progress: tqdm progress bars.
        expert_options: how mixture-of-experts layers are calibrated.
    """

    def __init__(
        self,
        model: nn.Module,
        stack: DecoderStack,
        layer_modules: list[list[PrunableLinear]],
        algorithm: PruningAlgorithm,
        checkpoint: ProgressListener | None = None,
        activations_device: str | torch.device | None = None,
        activations_max_memory: int | None = None,
        show_progress: bool = True,
        offload_statistics: bool = False,
        expert_options: ExpertOptions | None = None,
    ):
        self.expert_options = expert_options or ExpertOptions()
        self.model = model
        self.stack = stack
        self.layer_modules = layer_modules
        self.algorithm = algorithm
        self.checkpoint = checkpoint
        self.activations_device = activations_device
        self.activations_max_memory = activations_max_memory
        self.show_progress = show_progress
        #: keep each layer's statistics on the CPU between accumulation and their group's update
        self.offload_statistics = offload_statistics
        self.timings: dict[str, float] = {}
        # Every weight changed so far, as it was: written back if anything fails part-way.
        self._originals: dict[str, tuple[PrunableLinear, torch.Tensor]] = {}

    @property
    def num_layers(self) -> int:
        return len(self.stack.layers)

    def run(self, calibration: CalibrationSet, negative: CalibrationSet | None = None) -> WalkProgress:
        """Prune every layer on ``calibration`` (and lower importance on ``negative``, when given).

        If anything fails part-way, every weight already changed is restored before the exception
        propagates.
        """
        config = self.algorithm.config
        layout = [{m.name: list(m.shape) for m in modules} for modules in self.layer_modules]
        resume = self.checkpoint.load_state(layout) if self.checkpoint is not None else None
        # Data-parallel: every rank read the same state (the folder must be shared) before rank 0 writes.
        distributed.check_same_run(
            None if resume is None else (resume.completed_layers, resume.layer_sparsity),
            what="found another state in checkpoint_dir than rank 0: it must be a folder every rank sees",
        )
        self._has_negative = negative is not None
        self._languages = list(calibration.language_list)
        was_training = self.model.training
        self.model.eval()
        self.timings = {"statistics": 0.0, "pruning": 0.0, "propagation": 0.0}
        self._originals = {}
        try:
            # 1. What every decoder layer is called with, for the main, negative and signal batches.
            t = time.perf_counter()
            # Data-parallel: each rank captures and propagates its own shard of every set.
            # Whole groups of sequences, which a Hessian statistic multiplies together.
            group = self.algorithm.sequence_group
            batches = distributed.local_batches(calibration, config.batch_size, group_size=group)
            negative_batches = (
                distributed.local_batches(negative, config.batch_size, group_size=group)
                if negative is not None
                else []
            )
            needs_signal = self.algorithm.schedule_signal is not None and not (
                resume and resume.layer_sparsity
            )
            signal_batches = (
                distributed.local_batches(
                    calibration.first_per_language(config.layerwise_samples_per_language),
                    config.batch_size,
                    group_size=group,
                )
                if needs_signal
                else []
            )
            captured = capture_layer_inputs(
                self.model, self.stack, batches + negative_batches + signal_batches, input_device(self.model)
            )
            self.timings["capture"] = time.perf_counter() - t
            main_batches = batches + negative_batches

            # 2. The per-layer sparsity schedule (from the checkpoint when resuming).
            if resume is not None and resume.layer_sparsity:
                layer_sparsity, signal = list(resume.layer_sparsity), list(resume.layerwise_signal)
            else:
                signal = []
                if needs_signal:
                    t = time.perf_counter()
                    signal = self._measure_signal(
                        captured, signal_batches, len(main_batches), len(calibration.language_list)
                    )
                    self.timings["layerwise_signal"] = time.perf_counter() - t
                param_counts = [sum(m.shape[0] * m.shape[1] for m in ms) or 1 for ms in self.layer_modules]
                layer_sparsity = self.algorithm.layer_schedule(param_counts, signal)

            # 3. Layer by layer.
            hidden = ActivationStore(
                captured.hidden_states[: len(main_batches)],
                self.activations_device,
                self.activations_max_memory,
            )
            captured.hidden_states.clear()  # the store holds the only copy now
            try:
                result = self._walk(
                    captured, hidden, main_batches, len(batches), calibration, resume, layer_sparsity, signal
                )
            finally:
                hidden.close()
        except BaseException:
            for module, weight in self._originals.values():
                module.write_weight(weight)
            raise
        finally:
            self.model.train(was_training)
        return result

    # ------------------------------------------------------------------------------------------------
    def _walk(
        self,
        captured: CapturedInputs,
        hidden: ActivationStore,
        batches: list[dict[str, torch.Tensor]],
        n_main: int,
        calibration: CalibrationSet,
        resume: WalkProgress | None,
        layer_sparsity: list[float],
        signal: list[float],
    ) -> WalkProgress:
        checkpoint = self.checkpoint
        state = resume or WalkProgress()
        state.layer_sparsity, state.layerwise_signal = [float(s) for s in layer_sparsity], list(signal)
        first_layer = state.resumed_from_layer = state.completed_layers
        if first_layer:
            self._restore_checkpointed_layers(first_layer, hidden, captured, state)
        elif checkpoint is not None:
            checkpoint.save_progress(state, None)  # the schedule, so a resume skips the signal pass

        num_languages = len(calibration.language_list)
        with tqdm(
            total=self.num_layers,
            initial=first_layer,
            desc=f"Pruning ({self.algorithm.config.method})",
            unit="layer",
            disable=not self.show_progress,
        ) as progress:
            for index in range(first_layer, self.num_layers):
                layer = self.stack.layers[index]
                pruned = self._prune_layer(
                    index,
                    layer,
                    captured,
                    hidden,
                    batches,
                    n_main,
                    num_languages,
                    layer_sparsity[index],
                    state,
                )
                if checkpoint is not None and pruned:
                    checkpoint.save_layer(index, pruned)
                last = index == self.num_layers - 1
                if not last:  # nothing reads the last layer's outputs
                    self._propagate(index, layer, captured, hidden, len(batches))
                state.completed_layers = index + 1
                if checkpoint is not None:
                    # A data-parallel rank holds only its shard's activations: resumes recompute them.
                    keep_hidden = not last and not distributed.current_context().enabled
                    checkpoint.save_progress(state, hidden.as_list() if keep_hidden else None)
                progress.update(1)

        state.timings = self.timings
        return state

    def _restore_checkpointed_layers(
        self, completed: int, hidden: ActivationStore, captured: CapturedInputs, state: WalkProgress
    ) -> None:
        """Resume: re-apply the finished layers' pruned weights and reload the next layer's inputs."""
        for index in range(completed):
            saved = self.checkpoint.load_layer(index)
            for module in self.layer_modules[index]:
                weight = module.read_weight()
                self._remember(module, weight)
                module.write_weight(saved[module.name].to(weight.dtype))
        if completed >= self.num_layers:
            return
        saved = None if distributed.current_context().enabled else self.checkpoint.load_hidden()
        if saved is not None:
            for b, tensor in enumerate(saved):
                hidden[b] = tensor
            return
        # No saved activations (a data-parallel run saves none): rerun the finished, pruned layers.
        with torch.no_grad():
            for index in range(completed):
                for b in range(len(hidden)):
                    hidden[b] = captured.call(hidden[b], self.stack.layers[index], index, b)

    def _remember(self, module: PrunableLinear, weight: torch.Tensor) -> None:
        self._originals.setdefault(module.name, (module, weight.detach().to("cpu", copy=True)))

    def _prune_layer(
        self,
        index: int,
        layer: nn.Module,
        captured: CapturedInputs,
        hidden: ActivationStore,
        batches: list[dict[str, torch.Tensor]],
        n_main: int,
        num_languages: int,
        sparsity: float,
        state: WalkProgress,
    ) -> dict[str, torch.Tensor]:
        """Collect the layer's input statistics, then prune each shared-input group; the new weights."""
        modules = self.layer_modules[index]
        if not modules:
            return {}
        algorithm = self.algorithm
        t = time.perf_counter()
        collector = LayerStatisticsCollector(
            modules,
            lambda n, device: algorithm.new_statistic(n, num_languages, device),
            algorithm.new_negative_statistic if self._has_negative else None,
            num_languages=num_languages,
            expert_options=self.expert_options,
            new_expert_statistic=lambda n, device: algorithm.new_expert_statistic(n, num_languages, device),
        )
        with collector.attached(), torch.no_grad():
            for b, batch in enumerate(batches):
                collector.set_batch(batch["attention_mask"], batch["language"], negative=b >= n_main)
                collector.run(captured.call, hidden[b], layer, index, b)
                collector.end_batch()
        collector.synchronise()  # data-parallel: sums over every rank's shard
        if collector.start_fallback_pass():  # experts routed too few tokens: calibrated on every token
            with collector.attached(), torch.no_grad():
                for b, batch in enumerate(batches[:n_main]):
                    collector.set_batch(batch["attention_mask"], batch["language"])
                    collector.run(captured.call, hidden[b], layer, index, b)
                    collector.end_batch()
            collector.end_fallback_pass()
        state.experts.update(collector.expert_records(self._languages))
        if self.offload_statistics:  # the dense groups' statistics (experts' stay where they are)
            for statistic in collector.statistics:
                if hasattr(statistic, "offload_"):
                    statistic.offload_()
        self.timings["statistics"] += time.perf_counter() - t

        t = time.perf_counter()
        pruned: dict[str, torch.Tensor] = {}
        for group in collector.groups:
            weights = [module.read_weight() for module in group]
            for module, weight in zip(group, weights):
                if not torch.isfinite(weight).all():
                    raise ValueError(f"the weights of {module.name} hold NaN or infinite values")
            negative = collector.negative_statistic_for(group[0]) if collector.negative_statistics else None
            statistic = collector.statistic_for(group[0])
            if self.offload_statistics and hasattr(statistic, "restore_"):
                statistic.restore_()
            new_weights = algorithm.prune_group(group[0].name, weights, statistic, negative, sparsity)
            distributed.synchronise_weights(new_weights)  # identical on every rank (checked)
            self._write(group, weights, new_weights, pruned, state)
        for module in collector.never_ran():
            # No activation ever reached it, so no statistic exists: magnitude is the only score left. Never
            # silent: the report lists every such module.
            weight = module.read_weight()
            mask = mask_from_scores(weight.abs().float(), sparsity, algorithm.config.nm_structure)
            self._write([module], [weight], [weight.masked_fill(mask, 0)], pruned, state)
            state.magnitude_pruned.append(module.name)
            logger.warning(
                "%s never ran during calibration (no activations reach it): pruned by weight magnitude",
                module.name,
            )
        self.timings["pruning"] += time.perf_counter() - t
        return pruned

    def _write(
        self,
        group: list[PrunableLinear],
        weights: list[torch.Tensor],
        new_weights: list[torch.Tensor],
        pruned: dict[str, torch.Tensor],
        state: WalkProgress,
    ) -> None:
        for module, weight, new_weight in zip(group, weights, new_weights):
            self._remember(module, weight)
            new_weight = new_weight.to(weight.dtype)
            module.write_weight(new_weight)
            pruned[module.name] = new_weight
            state.module_sparsity[module.name] = float((new_weight == 0).float().mean())
            state.module_shapes[module.name] = list(module.shape)

    def _propagate(
        self, index: int, layer: nn.Module, captured: CapturedInputs, hidden: ActivationStore, n_batches: int
    ) -> None:
        """Replace the stored activations by the pruned layer's outputs (the next layer's inputs)."""
        t = time.perf_counter()
        with torch.no_grad():
            for b in range(n_batches):
                hidden[b] = captured.call(hidden[b], layer, index, b)
                if not torch.isfinite(hidden[b]).all():
                    raise FloatingPointError(
                        f"decoder layer {index} produced NaN or infinite hidden states after pruning"
                    )
        self.timings["propagation"] += time.perf_counter() - t

    def _measure_signal(
        self,
        captured: CapturedInputs,
        signal_batches: list[dict[str, Any]],
        first_batch: int,
        num_languages: int,
    ) -> list[float]:
        """One dense pass over the signal batches: the schedule's signal (OWL, CWL) of every layer."""
        from ..parts import FeatureStatistics

        hidden = [captured.hidden_states[first_batch + i] for i in range(len(signal_batches))]
        signal: list[float] = []
        for index in tqdm(
            range(self.num_layers),
            desc=f"Layer schedule ({self.algorithm.config.layerwise})",
            unit="layer",
            disable=not self.show_progress,
        ):
            layer, modules = self.stack.layers[index], self.layer_modules[index]
            collector = LayerStatisticsCollector(
                modules,
                lambda n, device: FeatureStatistics(n, num_languages, device=device),
                num_languages=num_languages,
                expert_options=self.expert_options,
            )
            with collector.attached(), torch.no_grad():
                for i, batch in enumerate(signal_batches):
                    collector.set_batch(batch["attention_mask"], batch["language"])
                    hidden[i] = captured.call(hidden[i], layer, index, first_batch + i)
                    collector.end_batch()
            collector.synchronise()
            signal.append(
                self.algorithm.layer_signal(
                    [m.read_weight() for m in modules if m.name in collector.group_of],
                    [collector.statistic_for(m) for m in modules if m.name in collector.group_of],
                    collector.statistics,
                )
            )
        return signal
