"""The record of one pruning run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PruningReport:
    """What :meth:`Pruner.prune_model` did.

    Attributes:
        method: ``"wanda"``, ``"sparsegpt"`` or ``"mwanda"``.
        config: the config as a dict (``PruningConfig.to_dict()``).
        target_sparsity: the configured mean sparsity.
        layer_sparsity: the target sparsity of each decoder layer (index order).
        module_sparsity: achieved fraction of zeros per pruned module (full module name).
        module_shapes: ``[out_features, in_features]`` per pruned module.
        languages: calibration languages in order.
        token_counts: non-padding calibration tokens per language.
        timings: wall seconds per phase (``capture``, ``statistics``, ``pruning``, ``propagation``, ``total``).
        layerwise_signal: the per-layer signal behind a non-uniform schedule (OWL outlier ratio or
            CWL cross-lingual correlation), empty for uniform.
        calibration_sources: ``{language: source}`` when known.
        calibration_settings: the calibration settings that actually applied
            (:attr:`optimum_mwanda.CalibrationSet.settings`: ``seq_len``, ``sequences_per_language``, and
            ``seed`` when texts were packed).
        architecture: the model's class name.
        base_model: the model's ``name_or_path`` (a Hub id or a local path) when it has one.
        negative_calibration_tokens: tokens of negative calibration text (Kim et al.), 0 when none was used.
        resumed_from_layer: the first decoder layer this call pruned (> 0 when it resumed a checkpoint).
    """

    method: str
    config: dict[str, Any]
    target_sparsity: float
    layer_sparsity: list[float] = field(default_factory=list)
    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    languages: list[str] = field(default_factory=list)
    token_counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    layerwise_signal: list[float] = field(default_factory=list)
    calibration_sources: dict[str, str] = field(default_factory=dict)
    calibration_settings: dict[str, Any] = field(default_factory=dict)
    architecture: str = ""
    base_model: str = ""
    negative_calibration_tokens: int = 0
    resumed_from_layer: int = 0

    @property
    def achieved_sparsity(self) -> float:
        """Zeros over all pruned weights (parameter-weighted mean of :attr:`module_sparsity`)."""
        total = zeros = 0.0
        for name, fraction in self.module_sparsity.items():
            out_f, in_f = self.module_shapes[name]
            total += out_f * in_f
            zeros += fraction * out_f * in_f
        return zeros / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["achieved_sparsity"] = self.achieved_sparsity
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningReport:
        data = {k: v for k, v in data.items() if k != "achieved_sparsity"}
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"
