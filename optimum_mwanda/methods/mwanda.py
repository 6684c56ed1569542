"""M-Wanda: Wanda's mask on language-aware feature importance, then a closed-form per-language mean
compensation of the kept weights (see docs/mwanda.md)."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..configuration import (
    MWANDA_DEFAULTS,
    ClosedForm,
    ColumnSweep,
    MWandaConfig,
    NoUpdate,
    WeightUpdate,
    automatic_hessian_token_stride,
)
from ..parts import FeatureStatistics, HessianStatistics, mean_shift_compensation, mwanda_feature_importance
from ..parts.compensation import covariance_factors, low_rank_compensation
from .registry import Description
from .sparsegpt import OBS_SCORE, sweep_group
from .wanda import WandaAlgorithm


class MWandaAlgorithm(WandaAlgorithm):
    """M-Wanda (Choenni & Titov, 2025) with our per-language mean compensation."""

    config_class: ClassVar[type[MWandaConfig]] = MWandaConfig
    config: MWandaConfig

    def __init__(self, config: MWandaConfig):
        super().__init__(config)
        # The explicit update (a resolved config holds it already; resolving again changes nothing).
        self._update = config.resolved_update()

    @property
    def supports_negative_calibration(self) -> bool:  # type: ignore[override]
        """Negative calibration lowers the score's feature importance: the sweep has no such score."""
        return not isinstance(self._update, ColumnSweep)

    # -- parts --------------------------------------------------------------------------------------------
    def mask_score(self) -> Description:
        if isinstance(self._update, ColumnSweep):
            return OBS_SCORE
        config = self.config
        settings = {
            "variance_weight": config.variance_weight,
            "activation_probability_weight": config.activation_probability_weight,
            "activation_threshold": config.activation_threshold,
            "negative_weight": config.negative_weight,
        }
        return Description(
            "mask score",
            "M-Wanda score",
            "Wanda's |W_ij| * ||X_j|| with language-aware feature importance (per-language norms and "
            "activation probability)",
            settings,
            "mwanda",
        )

    def weight_update(self) -> WeightUpdate:
        return self._update

    def describe_update(self) -> Description:
        update = self._update
        if isinstance(update, ClosedForm):
            return update.describe(self.config.mean_compensation)
        return update.describe()

    # -- statistics and pruning ---------------------------------------------------------------------------
    def new_statistic(
        self, in_features: int, num_languages: int, device: torch.device
    ) -> FeatureStatistics | HessianStatistics:
        config = self.config
        if isinstance(self._update, ColumnSweep):
            return HessianStatistics(
                in_features,
                num_languages,
                device=device,
                token_stride=self.hessian_token_stride(in_features),
                dtype=self.statistics_dtype,
                sequence_group=self.sequence_group,
            )
        rank = self._update.rank if isinstance(self._update, ClosedForm) else 0
        return FeatureStatistics(
            in_features,
            num_languages,
            device=device,
            track_activation=config.activation_probability_weight > 0,
            activation_threshold=config.activation_threshold,
            track_mean=config.mean_compensation != "none",
            sketch_width=rank + MWANDA_DEFAULTS.sketch_oversampling if rank else 0,
        )

    def hessian_token_stride(self, in_features: int) -> int:
        """The sweep's token stride for an ``in_features`` input: the resolved config's, or, for a config
        resolved without the run's size, :func:`~optimum_mwanda.configuration.automatic_hessian_token_stride`
        of the run's calibration tokens."""
        stride = self._update.stride_for(in_features) if isinstance(self._update, ColumnSweep) else None
        if stride is not None:
            return stride
        if self.calibration_tokens is None:
            raise RuntimeError(
                "the automatic hessian_token_stride needs calibration_tokens, set by the pruner"
            )
        return automatic_hessian_token_stride(self.calibration_tokens, in_features)

    def prune_group(self, name, weights, statistic, negative_statistic, sparsity):
        if isinstance(self._update, ColumnSweep):
            # The same sweep as SparseGPT's (reference block size and dampening), on the token-sampled
            # Hessian shrunk towards its diagonal.
            return sweep_group(name, weights, statistic, sparsity, self.config.nm_structure, self._update)
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
        update = self._update
        if isinstance(update, NoUpdate) or compensation == "none":
            return weight.masked_fill(mask, 0.0)
        if compensation == "language":
            means, second, shares = (
                statistic.language_means,
                statistic.language_second_moments,
                statistic.language_shares,
            )
        else:  # "pooled": the all-language mean only
            means, second, shares = statistic.pooled_mean, statistic.pooled_second_moment, torch.ones(1)
        rank, shrinkage = update.rank, update.shrinkage
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
