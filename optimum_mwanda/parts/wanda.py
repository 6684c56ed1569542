"""Wanda (Sun et al., 2024): weight magnitude times input-feature norm."""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, feature_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||``: ``weight`` is ``[out, in]``, ``feature_norm`` is ``[in]``."""
    if weight.dim() != 2 or feature_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"weight {tuple(weight.shape)} and feature norm {tuple(feature_norm.shape)} do not match"
        )
    return weight.abs().float() * feature_norm.float().unsqueeze(0)


def negative_feature_factor(
    feature_norm: torch.Tensor, negative_norm: torch.Tensor, power: float = 1.0, eps: float = 1e-8
) -> torch.Tensor:
    """Kim et al.'s penalty for features active on unwanted text: ``(||X_j|| / ||X_j^neg||) ** power``.

    Multiplied into a Wanda-style score it gives ``|W_ij| * ||X_j|| * (||X_j|| / ||X_j^neg||)``: features
    that fire more on the negative set than on the wanted set lose importance.
    """
    ratio = feature_norm.float() / negative_norm.float().clamp_min(eps)
    return ratio.clamp_min(eps).pow(power)
