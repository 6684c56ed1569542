"""Pure pruning math: scores, masks, layer schedules and running statistics (no hooks, no I/O)."""

from .compensation import covariance_factors, low_rank_compensation, mean_shift_compensation
from .layerwise import (
    cross_lingual_correlation,
    cwl_schedule,
    depth_schedule,
    outlier_ratio,
    owl_schedule,
    schedule_from_signal,
)
from .masks import mask_from_scores, nm_mask, per_row_mask
from .mwanda import mwanda_feature_importance
from .sparsegpt import CholeskyError, refine_kept_weights, sparsegpt_prune, sparsegpt_prune_group
from .statistics import (
    CovarianceSketch,
    FeatureStatistics,
    HessianStatistics,
    hessian_token_stride_for,
)
from .wanda import negative_feature_factor, wanda_scores

__all__ = [
    "CholeskyError",
    "CovarianceSketch",
    "FeatureStatistics",
    "HessianStatistics",
    "hessian_token_stride_for",
    "covariance_factors",
    "cross_lingual_correlation",
    "cwl_schedule",
    "depth_schedule",
    "low_rank_compensation",
    "mask_from_scores",
    "mean_shift_compensation",
    "mwanda_feature_importance",
    "negative_feature_factor",
    "nm_mask",
    "outlier_ratio",
    "owl_schedule",
    "per_row_mask",
    "schedule_from_signal",
    "refine_kept_weights",
    "sparsegpt_prune",
    "sparsegpt_prune_group",
    "wanda_scores",
]
