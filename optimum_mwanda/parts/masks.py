"""Masks from scores. A mask is a bool tensor shaped like the weight, ``True`` where a weight is pruned."""

from __future__ import annotations

import torch


def lowest_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """``True`` at the ``k`` lowest values of every row of a 2-D tensor; ties go to the earlier position.

    Selection in O(n) per row (``kthvalue`` for the threshold), not a full sort: the same mask a stable
    sort would give.
    """
    rows, cols = values.shape
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = torch.kthvalue(values, k, dim=1, keepdim=True).values
    at_most = values <= threshold
    # Without ties at the threshold exactly k values of every row are at most it: that is the mask, and
    # the position-ordered tie-break below (a cumulative sum over the row) is not needed.
    if bool((at_most.sum(dim=1) == k).all()):
        return at_most
    below = values < threshold
    # Among values equal to the threshold, take the first (k - #below) by position.
    missing = k - below.sum(dim=1, keepdim=True)
    equal = values == threshold
    return below | (equal & (equal.cumsum(dim=1) <= missing))


def lowest_k_per_column(values: torch.Tensor, k: int) -> torch.Tensor:
    """``True`` at the ``k`` lowest values of every column of a short ``[m, cols]`` tensor (an N:M group);
    ties go to the earlier position, the mask a stable sort would give.

    By pairwise ranks (``m^2`` comparisons per column) instead of a sort: SparseGPT's N:M sweep selects one
    such group every ``m`` columns, and on CPU the sort was the largest single cost of its loop.
    """
    m = values.shape[0]
    order = torch.arange(m, device=values.device)
    earlier = (order.unsqueeze(1) < order.unsqueeze(0)).unsqueeze(2)  # [other, this, 1]
    other, this = values.unsqueeze(1), values.unsqueeze(0)
    rank = ((other < this) | ((other == this) & earlier)).sum(dim=0)
    return rank < k


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(in_features * sparsity)`` lowest-scoring weights of every output row.

    Ties are broken by position (the earlier weight is pruned first), so the result is deterministic.
    """
    _check_scores(scores)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return lowest_k_mask(scores, int(scores.shape[1] * sparsity))


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
        raise FloatingPointError(
            "pruning scores contain NaN or infinite values (non-finite weights or activation statistics)"
        )
