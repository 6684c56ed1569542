"""M-Wanda: Wanda's mask on language-aware feature importance, then a closed-form per-language mean
compensation of the kept weights (see docs/mwanda.md)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..configuration import MWandaConfig, SparseGPTConfig
from ..parts import (
    FeatureStatistics,
    HessianStatistics,
    hessian_token_stride_for,
    mean_shift_compensation,
    mwanda_feature_importance,
)
from ..parts.compensation import covariance_factors, low_rank_compensation
from .sparsegpt import sweep_group
from .wanda import WandaAlgorithm


class MWandaAlgorithm(WandaAlgorithm):
    """M-Wanda (Choenni & Titov, 2025) with our per-language mean compensation."""

    config_class: ClassVar[type[MWandaConfig]] = MWandaConfig
    config: MWandaConfig

    @property
    def supports_negative_calibration(self) -> bool:  # type: ignore[override]
        """Negative calibration lowers the score's feature importance: the sweep has no such score."""
        return self.config.weight_update != "sweep"

    def new_statistic(
        self, in_features: int, num_languages: int, device: torch.device
    ) -> FeatureStatistics | HessianStatistics:
        config = self.config
        if config.weight_update == "sweep":
            return HessianStatistics(
                in_features,
                num_languages,
                device=device,
                token_stride=self.hessian_token_stride(in_features),
                dtype=self.statistics_dtype,
            )
        return FeatureStatistics(
            in_features,
            num_languages,
            device=device,
            track_activation=config.activation_probability_weight > 0,
            activation_threshold=config.activation_threshold,
            track_mean=config.mean_compensation != "none",
            sketch_width=config.compensation_rank + config.sketch_oversampling
            if config.compensation_rank
            else 0,
        )

    def hessian_token_stride(self, in_features: int) -> int:
        """The sweep's token stride for an ``in_features`` input: the config's, or with ``None`` the largest
        up to ``max_hessian_token_stride`` that leaves ``hessian_tokens_per_input`` sampled tokens per input
        of the run's calibration tokens (:func:`optimum_mwanda.parts.hessian_token_stride_for`)."""
        stride = self.config.hessian_token_stride
        if stride is not None:
            return stride
        if self.calibration_tokens is None:
            raise RuntimeError(
                "the automatic hessian_token_stride needs calibration_tokens, set by the pruner"
            )
        return hessian_token_stride_for(
            self.calibration_tokens,
            in_features,
            MWandaConfig.max_hessian_token_stride,
            MWandaConfig.hessian_tokens_per_input,
        )

    def prune_group(self, name, weights, statistic, negative_statistic, sparsity):
        if self.config.weight_update == "sweep":
            # SparseGPT's reference block size and dampening: the sweep is the same algorithm, on the
            # token-sampled Hessian shrunk towards its diagonal.
            return sweep_group(
                name,
                weights,
                statistic,
                sparsity,
                self.config.nm_structure,
                SparseGPTConfig.block_size,
                SparseGPTConfig.dampening,
                self.config.diagonal_dampening,
                self.config.nm_selection,
                self.config.refinement_steps,
            )
        return super().prune_group(name, weights, statistic, negative_statistic, sparsity)

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
            means, second, shares = (
                statistic.language_means,
                statistic.language_second_moments,
                statistic.language_shares,
            )
        else:  # "pooled": the all-language mean only
            means, second, shares = statistic.pooled_mean, statistic.pooled_second_moment, torch.ones(1)
        rank = self.config.compensation_rank
        shrinkage = self.config.diagonal_dampening
        if not rank and not shrinkage:
            return mean_shift_compensation(weight, mask, means, second, shares)
        directions = eigenvalues = None
        if rank:
            # Directions of the covariance left once every language's mean is removed (shares as weights).
            directions, eigenvalues = statistic.sketch.principal_directions(
                statistic.tokens.sum(), statistic.language_means, statistic.language_shares, rank
            )
        within = (statistic.language_second_moments - statistic.language_means.pow(2)).clamp_min(0.0)
        within = (within * statistic.language_shares.float().unsqueeze(1)).sum(0)
        if compensation == "pooled":
            # The pooled mean leaves the between-language spread in the noise: add it to the diagonal.
            within = (second - means.pow(2)).clamp_min(0.0).squeeze(0)
        # Rank 0 with a shrinkage: the means-only model of H through the general (Woodbury) form.
        factors, diagonal = covariance_factors(
            means, shares.to(means.device), directions, eigenvalues, within, diagonal_dampening=shrinkage
        )
        return low_rank_compensation(weight, mask, factors, diagonal)
