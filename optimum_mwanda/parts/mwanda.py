"""M-Wanda feature importance (our formulation; see docs/mwanda.md)."""

from __future__ import annotations

import torch


def mwanda_feature_importance(
    pooled_norm: torch.Tensor,
    language_norms: torch.Tensor,
    activation_probability: torch.Tensor,
    variance_weight: float,
    activation_probability_weight: float,
) -> torch.Tensor:
    """Per-input-feature importance that replaces Wanda's ``||X_j||``.

    ``importance_j = (||X_j|| + variance_weight * std_l a[l, j]) * (1 + activation_probability_weight *
    max_l p[l, j])`` where ``||X_j||`` is the pooled (all-language) norm, ``a[l, j]`` the per-language norms
    (``[L, in]``) and ``p[l, j]`` the share of language-``l`` tokens on which feature ``j`` is active. With
    both weights at 0 it is exactly ``pooled_norm``, so the masks reduce to Wanda's.
    """
    if language_norms.dim() != 2 or language_norms.shape[1] != pooled_norm.shape[0]:
        raise ValueError(
            f"language norms {tuple(language_norms.shape)} do not match pooled norm {tuple(pooled_norm.shape)}"
        )
    importance = pooled_norm.float()
    if variance_weight and language_norms.shape[0] > 1:
        spread = language_norms.float().std(dim=0, unbiased=False)
        importance = importance + variance_weight * spread
    if activation_probability_weight:
        peak = activation_probability.float().amax(dim=0)
        importance = importance * (1.0 + activation_probability_weight * peak)
    return importance
