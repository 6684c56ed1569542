"""M-Wanda: Wanda's mask on language-aware feature importance, then a closed-form per-language mean
compensation of the kept weights (see docs/mwanda.md)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..configuration import MWandaConfig
from ..methods import FeatureStatistics, mean_shift_compensation, mwanda_feature_importance
from .wanda import WandaAlgorithm


class MWandaAlgorithm(WandaAlgorithm):
    """M-Wanda (Choenni & Titov, 2025) with our per-language mean compensation."""

    config_class: ClassVar[type[MWandaConfig]] = MWandaConfig
    config: MWandaConfig

    def new_statistic(self, in_features: int, num_languages: int, device: torch.device) -> FeatureStatistics:
        config = self.config
        return FeatureStatistics(
            in_features,
            num_languages,
            device=device,
            track_activation=config.activation_probability_weight > 0,
            activation_threshold=config.activation_threshold,
            track_mean=config.mean_compensation != "none",
        )

    def feature_importance(self, statistic: FeatureStatistics) -> torch.Tensor:
        config = self.config
        pooled = statistic.pooled_norm
        probability = (
            statistic.activation_probability
            if statistic.active is not None
            else torch.zeros(1, pooled.numel(), device=pooled.device)
        )
        return mwanda_feature_importance(
            pooled,
            statistic.language_norms,
            probability,
            config.variance_weight,
            config.activation_probability_weight,
        )

    def update_kept_weights(self, weight, mask, statistic):
        compensation = self.config.mean_compensation
        if compensation == "none":
            return weight.masked_fill(mask, 0.0)
        if compensation == "language":
            moments = (statistic.language_means, statistic.language_second_moments, statistic.language_shares)
        else:  # "pooled": the all-language mean only
            moments = (statistic.pooled_mean, statistic.pooled_second_moment, torch.ones(1))
        return mean_shift_compensation(weight, mask, *moments)
