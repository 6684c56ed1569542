"""What every pruning algorithm provides to the sequential walk, and the parts it is described by.

A method is a mask score, a weight update (:class:`~optimum_mwanda.configuration.NoUpdate`,
:class:`~optimum_mwanda.configuration.ClosedForm` or :class:`~optimum_mwanda.configuration.ColumnSweep`)
and a :class:`LayerSchedule`; :meth:`PruningAlgorithm.describe` gives them to the card, the CLI and the
report. An algorithm is chosen from its config (:func:`optimum_mwanda.methods.algorithm_for`) and owns everything
that differs between methods: which running statistic the walk collects for a shared-input group of linear
modules, how that statistic turns the group's weights into pruned weights, and the per-layer sparsity
schedule. It sees tensors only: hooks, devices, offloading and files belong to the walk in ``modeling/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..configuration import NoUpdate, PruningConfig, WeightUpdate
from ..parts import (
    FeatureStatistics,
    cross_lingual_correlation,
    cwl_schedule,
    depth_schedule,
    outlier_ratio,
    owl_schedule,
    wanda_scores,
)
from ..parts.layerwise import uniform_schedule
from .registry import Description, MethodDescription, method_entry, method_names

_SCHEDULE_TEXT = {
    "uniform": "uniform: every decoder layer at the target sparsity",
    "depth": "depth ramp (deeper layers sparser)",
    "owl": "OWL (outlier-weighted)",
    "cwl": "CWL (cross-lingual correlation, protecting language-{protect} layers)",
}


@dataclass(frozen=True)
class LayerSchedule:
    """Part: the per-layer sparsity schedule, parameter-weighted mean ``sparsity``."""

    kind: str
    layerwise_range: float
    owl_outlier_threshold: float = 5.0
    cwl_protect: str = "specific"

    @property
    def signal(self) -> str | None:
        """``"owl"`` or ``"cwl"`` when the schedule needs a dense measuring pass, else ``None``."""
        return self.kind if self.kind in ("owl", "cwl") else None

    def targets(self, param_counts: Sequence[int], signal: Sequence[float], sparsity: float) -> list[float]:
        """Target sparsity of every decoder layer."""
        if self.kind == "uniform":
            return uniform_schedule(len(param_counts), sparsity)
        if self.kind == "depth":
            return depth_schedule(param_counts, sparsity, self.layerwise_range)
        if self.kind == "owl":
            return owl_schedule(signal, param_counts, sparsity, self.layerwise_range)
        return cwl_schedule(signal, param_counts, sparsity, self.layerwise_range, self.cwl_protect)

    def describe(self) -> Description:
        settings: dict[str, Any] = {}
        if self.kind != "uniform":
            settings["layerwise_range"] = self.layerwise_range
        if self.kind == "owl":
            settings["owl_outlier_threshold"] = self.owl_outlier_threshold
        if self.kind == "cwl":
            settings["cwl_protect"] = self.cwl_protect
        citation = {"owl": "owl", "cwl": "mwanda"}.get(self.kind)
        summary = _SCHEDULE_TEXT.get(self.kind, self.kind).format(protect=self.cwl_protect)
        return Description("layer schedule", self.kind, summary, settings, citation)


class PruningAlgorithm:
    """Base class: subclasses set :attr:`config_class` and implement the two statistic/pruning hooks.

    Args:
        config: the run's config (an instance of :attr:`config_class`).
    """

    config_class: ClassVar[type[PruningConfig]] = PruningConfig
    #: whether negative calibration (Kim et al.) can lower feature importance for this method
    supports_negative_calibration: ClassVar[bool] = False

    def __init__(self, config: PruningConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}")
        self.config = config
        #: non-padding calibration tokens of the whole run (all ranks), set by the pruner before the walk:
        #: what a statistic sized from the calibration budget (M-Wanda's automatic Hessian sample) reads
        self.calibration_tokens: int | None = None
        #: dtype of the in x in Hessian accumulators (SparseGPT, M-Wanda's sweep); set by the pruner
        self.statistics_dtype: torch.dtype = torch.float64
        #: consecutive sequences per Hessian product (``parts.statistics.sequence_group_for`` of the run's
        #: sequence count, set by the pruner); the walk deals data-parallel shards in groups of this many
        self.sequence_group: int = 1

    # -- statistics ----------------------------------------------------------------------------------
    def new_statistic(self, in_features: int, num_languages: int, device: torch.device) -> Any:
        """A fresh running statistic for one shared-input group (``update(x, language)``)."""
        raise NotImplementedError

    def new_expert_statistic(self, in_features: int, num_languages: int, device: torch.device) -> Any:
        """The statistic of one expert's projection: :meth:`new_statistic`, with a token-strided Hessian
        sample back to every token and one product per sequence. An expert sees about
        ``top_k / num_experts`` of the tokens, so the stride sized from the whole run's token count would
        leave its Hessian too few tokens."""
        statistic = self.new_statistic(in_features, num_languages, device)
        if getattr(statistic, "token_stride", 1) > 1:
            statistic.token_stride = 1
        # One product per sequence: a group's tokens would wait in every expert's statistic at once (128
        # experts of 2048 inputs: 1 GiB), for little gain on the few tokens an expert sees.
        if getattr(statistic, "sequence_group", 1) > 1:
            statistic.sequence_group = 1
        return statistic

    def new_negative_statistic(self, in_features: int, device: torch.device) -> FeatureStatistics:
        """The statistic kept for negative-calibration tokens (one pseudo-language)."""
        return FeatureStatistics(in_features, 1, device=device)

    # -- pruning ---------------------------------------------------------------------------------------
    def prune_group(
        self,
        name: str,
        weights: list[torch.Tensor],
        statistic: Any,
        negative_statistic: FeatureStatistics | None,
        sparsity: float,
    ) -> list[torch.Tensor]:
        """New float32 ``[out, in]`` weights for modules that read the same input (``name`` for errors)."""
        raise NotImplementedError

    # -- parts and description --------------------------------------------------------------------------
    def mask_score(self) -> Description:
        """Part: what ranks the weights (subclasses describe theirs)."""
        raise NotImplementedError

    def weight_update(self) -> WeightUpdate:
        """Part: what happens to the kept weights (default: nothing)."""
        return NoUpdate()

    def schedule(self) -> LayerSchedule:
        """Part: the per-layer sparsity schedule of the config."""
        config = self.config
        return LayerSchedule(
            config.layerwise or "uniform",
            config.layerwise_range,
            config.owl_outlier_threshold,
            getattr(config, "cwl_protect", "specific"),
        )

    def describe_update(self) -> Description:
        return self.weight_update().describe()

    def describe(self) -> MethodDescription:
        """The method as its parts, from the registry entry of the config's method."""
        name = self.config.method
        entry = method_entry(name) if name in method_names() else None
        return MethodDescription(
            name,
            entry.title if entry else name,
            entry.summary if entry else "",
            (self.mask_score(), self.describe_update(), self.schedule().describe()),
        )

    # -- layer schedule --------------------------------------------------------------------------------
    @property
    def schedule_signal(self) -> str | None:
        """``"owl"`` or ``"cwl"`` when the schedule needs a dense measuring pass, else ``None``."""
        return self.schedule().signal

    def layer_signal(
        self,
        weights: Sequence[torch.Tensor],
        module_statistics: Sequence[FeatureStatistics],
        group_statistics: Sequence[FeatureStatistics],
    ) -> float:
        """One layer's schedule signal from a dense pass: OWL's outlier ratio of the modules' Wanda scores
        (``weights[i]`` read ``module_statistics[i]``), or CWL's cross-lingual correlation of the per-language
        norms of every distinct input (``group_statistics``, one per shared-input group)."""
        if not weights:
            return 0.0
        if self.config.layerwise == "owl":
            scores = [
                wanda_scores(w.to(s.pooled_norm.device), s.pooled_norm)
                for w, s in zip(weights, module_statistics)
            ]
            return outlier_ratio(scores, self.config.owl_outlier_threshold)
        profiles = torch.cat([s.language_norms.cpu() for s in group_statistics], dim=1)
        return cross_lingual_correlation(profiles)

    def layer_schedule(self, param_counts: Sequence[int], signal: Sequence[float]) -> list[float]:
        """Target sparsity of every decoder layer, parameter-weighted mean ``config.sparsity``."""
        return self.schedule().targets(param_counts, signal, self.config.sparsity)
