"""Wanda (Sun et al., 2024): keep the weights with the largest ``|W_ij| * ||X_j||`` in every output row."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..configuration import WandaConfig
from ..parts import FeatureStatistics, mask_from_scores, negative_feature_factor, wanda_scores
from .base import PruningAlgorithm
from .registry import Description


class WandaAlgorithm(PruningAlgorithm):
    """Wanda: pooled input-feature norms, per-row (or N:M) masks, kept weights unchanged."""

    config_class: ClassVar[type[WandaConfig]] = WandaConfig
    supports_negative_calibration: ClassVar[bool] = True
    config: WandaConfig

    def new_statistic(self, in_features: int, num_languages: int, device: torch.device) -> FeatureStatistics:
        return FeatureStatistics(in_features, num_languages, device=device)

    def mask_score(self) -> Description:
        settings = {"negative_weight": self.config.negative_weight}
        return Description(
            "mask score",
            "Wanda score",
            "|W_ij| * ||X_j||, compared within each output row",
            settings,
            "wanda",
        )

    def feature_importance(self, statistic: FeatureStatistics) -> torch.Tensor:
        """``[in]``: what multiplies ``|W_ij|`` in the score (Wanda: the pooled norm ``||X_j||``)."""
        return statistic.pooled_norm

    def prune_group(self, name, weights, statistic, negative_statistic, sparsity):
        importance = self.feature_importance(statistic)
        if negative_statistic is not None:
            importance = importance * negative_feature_factor(
                statistic.pooled_norm, negative_statistic.pooled_norm, self.config.negative_weight
            )
        if not torch.isfinite(importance).all():
            raise FloatingPointError(
                f"non-finite input activations reached {name}: its calibration statistics hold NaN or inf"
            )
        pruned = []
        for weight in weights:
            weight = weight.to(importance.device).float()
            mask = mask_from_scores(wanda_scores(weight, importance), sparsity, self.config.nm_structure)
            pruned.append(self.update_kept_weights(weight, mask, statistic))
        return pruned

    def update_kept_weights(
        self, weight: torch.Tensor, mask: torch.Tensor, statistic: FeatureStatistics
    ) -> torch.Tensor:
        """The pruned weight given its mask (``True`` = pruned). Wanda leaves the kept weights alone."""
        return weight.masked_fill(mask, 0.0)
