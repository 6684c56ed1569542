"""Per-decoder-layer sparsity schedules: uniform, depth ramp, OWL (outlier ratio) and CWL (cross-lingual
correlation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def uniform_schedule(num_layers: int, target: float) -> list[float]:
    return [float(target)] * num_layers


def schedule_from_signal(
    signal: Sequence[float],
    param_counts: Sequence[float],
    target: float,
    bound: float,
    higher_signal_prunes_less: bool,
) -> list[float]:
    """Map a per-layer signal to sparsities in ``[target - bound, target + bound]``.

    The signal is min-max scaled onto ``[-bound, +bound]`` (negated when a higher signal should prune less),
    then shifted by one constant so that the parameter-weighted mean sparsity equals ``target`` exactly;
    values are clipped to the bounds, and the shift is found by bisection (the clipped mean is monotone in
    it). A constant signal gives the uniform schedule.
    """
    values = torch.tensor(list(signal), dtype=torch.float64)
    weights = torch.tensor(list(param_counts), dtype=torch.float64)
    if values.shape != weights.shape or values.numel() == 0:
        raise ValueError("signal and param_counts must be non-empty and of the same length")
    if not torch.isfinite(values).all():
        raise ValueError("the layerwise signal contains NaN or infinite values")
    if (weights <= 0).any():
        raise ValueError("param_counts must be positive")
    spread = values.max() - values.min()
    if bound == 0 or spread <= 1e-12:
        return uniform_schedule(values.numel(), target)
    offsets = bound * (2.0 * (values - values.min()) / spread - 1.0)
    if higher_signal_prunes_less:
        offsets = -offsets
    low, high = target - bound, target + bound

    def weighted_mean(shift: float) -> float:
        sparsity = (target + offsets + shift).clamp(low, high)
        return float((sparsity * weights).sum() / weights.sum())

    lo, hi = -2.0 * bound, 2.0 * bound
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if weighted_mean(mid) < target:
            lo = mid
        else:
            hi = mid
    shift = 0.5 * (lo + hi)
    return [float(s) for s in (target + offsets + shift).clamp(low, high)]


def depth_schedule(param_counts: Sequence[float], target: float, bound: float) -> list[float]:
    """Sparsity rising linearly with depth, from ``target - bound`` to ``target + bound`` before the shift
    that makes the parameter-weighted mean equal ``target``: early layers, whose errors every later layer
    inherits, keep more weights."""
    return schedule_from_signal(
        list(range(len(param_counts))), param_counts, target, bound, higher_signal_prunes_less=False
    )


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """OWL's layer outlier ratio: share of a layer's Wanda scores above ``threshold`` x their mean."""
    flat = torch.cat([s.flatten().float() for s in scores])
    return float((flat > threshold * flat.mean()).float().mean())


def owl_schedule(
    outlier_ratios: Sequence[float], param_counts: Sequence[float], target: float, bound: float
) -> list[float]:
    """OWL (Yin et al., 2024): layers with more outliers keep more weights."""
    return schedule_from_signal(outlier_ratios, param_counts, target, bound, higher_signal_prunes_less=True)


def cross_lingual_correlation(language_profiles: torch.Tensor) -> float:
    """Mean pairwise Pearson correlation between languages' activation profiles (``[L, features]``)."""
    if language_profiles.dim() != 2 or language_profiles.shape[0] < 2:
        raise ValueError("cross-lingual correlation needs activation profiles of at least two languages")
    profiles = language_profiles.double()
    centred = profiles - profiles.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    unit = centred / norms
    corr = unit @ unit.t()
    n = corr.shape[0]
    off_diagonal = corr.sum() - corr.diagonal().sum()
    return float(off_diagonal / (n * (n - 1)))


def cwl_schedule(
    correlations: Sequence[float],
    param_counts: Sequence[float],
    target: float,
    bound: float,
    protect: str = "specific",
) -> list[float]:
    """CWL: sparsity from cross-lingual correlation.

    ``protect="specific"``: less-correlated (language-specific) layers keep more weights;
    ``protect="shared"``: more-correlated (shared) layers keep more weights.
    """
    if protect not in ("specific", "shared"):
        raise ValueError(f"protect must be 'specific' or 'shared', got {protect!r}")
    return schedule_from_signal(
        correlations, param_counts, target, bound, higher_signal_prunes_less=(protect == "shared")
    )
