"""Masks from scores. A mask is a bool tensor shaped like the weight, ``True`` where a weight is pruned."""

from __future__ import annotations

import torch


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(in_features * sparsity)`` lowest-scoring weights of every output row.

    Ties are broken by position (stable sort), so the result is deterministic.
    """
    _check_scores(scores)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    rows, cols = scores.shape
    n_pruned = int(cols * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_pruned == 0:
        return mask
    order = torch.sort(scores, dim=1, stable=True).indices[:, :n_pruned]
    return mask.scatter_(1, order, True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest-scoring weights in every group of ``m`` consecutive inputs of each row."""
    _check_scores(scores)
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    # Stable sort so that equal scores prune the earlier position first, as in per_row_mask.
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, : m - n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order, True)
    return mask.reshape(rows, cols)


def mask_from_scores(scores: torch.Tensor, sparsity: float, nm: tuple[int, int] | None) -> torch.Tensor:
    """Per-row unstructured mask, or an N:M mask when ``nm`` is given."""
    if nm is None:
        return per_row_mask(scores, sparsity)
    return nm_mask(scores, *nm)


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [out_features, in_features], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("pruning scores contain NaN or infinite values")
