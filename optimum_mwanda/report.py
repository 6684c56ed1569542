"""The record of one pruning run."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from .configuration import PruningConfig, config_class_for_method
from .modeling.coverage import UNREACHABLE, CoveragePlan
from .version import __version__

logger = logging.getLogger(__name__)


@dataclass
class PruningReport:
    """What :meth:`Pruner.prune_model` did.

    Attributes:
        method: ``"wanda"``, ``"sparsegpt"`` or ``"mwanda"``.
        config: the resolved :class:`~optimum_mwanda.PruningConfig` the run used, every automatic choice
            explicit (:meth:`~optimum_mwanda.PruningConfig.resolve`); a dict given here, as older code and
            ``pruning_report.json`` files hold it, is rebuilt into the config object.
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
            ``seed`` when texts were packed); the model card shows these, never the config's sampling knobs
            that did not apply (token ids or a ready :class:`CalibrationSet` given).
        architecture: the model's class name.
        base_model: the model's ``name_or_path`` (a Hub id or a local path) when it has one.
        negative_calibration_tokens: tokens of negative calibration text (Kim et al.), 0 when none was used.
        resumed_from_layer: the first decoder layer this call pruned (> 0 when it resumed a checkpoint).
        coverage: every >= 2-D parameter of the decoder layers: pruned, dense by design (with the reason),
            or unreachable and left dense (only with ``allow_unpruned``); ``None`` in reports of older
            versions.
        experts: per fused-experts module (mixture-of-experts models): ``num_experts``, routed calibration
            ``tokens`` per expert, ``fallback`` per expert (fewer tokens than ``expert_options["min_tokens"]``:
            calibrated on every token of its MoE block instead) and ``routing_shares``
            (``{language: [share of that language's routed tokens per expert]}``).
        expert_options: the :class:`~optimum_mwanda.modeling.experts.ExpertOptions` that applied (empty for
            dense models).
        magnitude_pruned: linear modules that never ran during calibration (cross-attention without an
            encoder, Mamba's ``dt_proj`` whose weight the model reads directly): no activation statistics
            exist for them, so they were pruned by weight magnitude, at their layer's sparsity and structure.
        optimum_mwanda_version: the package version that pruned (stored inside ``config`` in the JSON form).
    """

    method: str
    config: PruningConfig
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
    coverage: CoveragePlan | None = None
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    expert_options: dict[str, Any] = field(default_factory=dict)
    magnitude_pruned: list[str] = field(default_factory=list)
    optimum_mwanda_version: str = __version__

    def __post_init__(self) -> None:
        if isinstance(self.config, dict):
            config = dict(self.config)
            self.optimum_mwanda_version = str(
                config.pop("optimum_mwanda_version", self.optimum_mwanda_version)
            )
            self.config = _config_from_dict({"method": self.method, **config})
        if not isinstance(self.config, PruningConfig):
            raise TypeError(f"PruningReport.config must be a PruningConfig, got {type(self.config).__name__}")
        if isinstance(self.coverage, dict):
            self.coverage = CoveragePlan.from_dict(self.coverage)

    @property
    def achieved_sparsity(self) -> float:
        """Zeros over all weights the run was to prune: every pruned module and expert matrix
        (parameter-weighted :attr:`module_sparsity`) plus, dense, every unreachable weight left so by
        ``allow_unpruned`` (so that a weight left dense can never look pruned)."""
        total = zeros = 0.0
        for name, fraction in self.module_sparsity.items():
            out_f, in_f = self.module_shapes[name]
            total += out_f * in_f
            zeros += fraction * out_f * in_f
        if self.coverage is not None:
            total += sum(entry.numel for entry in self.coverage.unreachable)
        return zeros / total if total else 0.0

    @property
    def expert_fallbacks(self) -> dict[str, list[int]]:
        """``{experts module: [experts calibrated by the fallback rule]}`` (only modules with some), for the
        model card."""
        return {
            name: [e for e, fell_back in enumerate(record.get("fallback", [])) if fell_back]
            for name, record in self.experts.items()
            if any(record.get("fallback", []))
        }

    @property
    def routing_shares(self) -> dict[str, dict[str, list[float]]]:
        """``{language: {experts module: share of the language's routed tokens per expert}}``."""
        shares: dict[str, dict[str, list[float]]] = {}
        for name, record in self.experts.items():
            for language, values in record.get("routing_shares", {}).items():
                shares.setdefault(language, {})[name] = values
        return shares

    @property
    def unpruned_weights(self) -> list[str]:
        """Decoder-layer weights left dense although the method should have pruned them (``allow_unpruned``)."""
        return [] if self.coverage is None else [e.name for e in self.coverage.with_status(UNREACHABLE)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; ``config`` is ``PruningConfig.to_dict()`` stamped with the version that pruned."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        version = data.pop("optimum_mwanda_version")
        coverage = data.pop("coverage")
        data = json.loads(json.dumps({**data, "config": None}))  # deep copies of the containers
        data["config"] = {**self.config.to_dict(), "optimum_mwanda_version": version}
        data["coverage"] = None if coverage is None else coverage.to_dict()
        data["achieved_sparsity"] = self.achieved_sparsity
        description = self.method_description
        if description is not None:
            data["method_description"] = description.to_dict()
        return data

    @property
    def method_description(self):
        """The method's parts as the registry describes them, with the run's resolved settings (``None`` for
        a method this installation does not register)."""
        from .methods import describe_method

        try:
            return describe_method(self.config)
        except TypeError:
            return None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningReport:
        """Rebuild a report from :meth:`to_dict` output (also ``pruning_report.json`` of older versions)."""
        data = {k: v for k, v in data.items() if k not in ("achieved_sparsity", "method_description")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown pruning report fields %s (written by a newer version?)", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _config_from_dict(data: dict[str, Any]) -> PruningConfig:
    """The config of a stored report; fields this version does not know (an older or newer writer) are
    dropped with a warning rather than making the whole report unreadable."""
    config_class = config_class_for_method(data["method"])
    known = {f.name for f in dataclasses.fields(config_class)} | set(config_class.legacy_fields)
    unknown = sorted(set(data) - known - {"method"})
    if unknown:
        logger.warning("ignoring %s fields unknown to this version: %s", config_class.__name__, unknown)
    return config_class.from_dict({k: v for k, v in data.items() if k not in unknown})
