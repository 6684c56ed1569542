"""Pure pruning math: scores, masks, layer schedules and running statistics (no hooks, no I/O)."""

from .compensation import mean_shift_compensation
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
from .sparsegpt import CholeskyError, sparsegpt_prune, sparsegpt_prune_group
from .statistics import FeatureStatistics, HessianStatistics
from .wanda import negative_feature_factor, wanda_scores

__all__ = [
    "CholeskyError",
    "FeatureStatistics",
    "HessianStatistics",
    "cross_lingual_correlation",
    "cwl_schedule",
    "depth_schedule",
    "mask_from_scores",
    "mean_shift_compensation",
    "mwanda_feature_importance",
    "negative_feature_factor",
    "nm_mask",
    "outlier_ratio",
    "owl_schedule",
    "per_row_mask",
    "schedule_from_signal",
    "sparsegpt_prune",
    "sparsegpt_prune_group",
    "wanda_scores",
]
