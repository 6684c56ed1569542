"""SparseGPT (Frantar & Alistarh, 2023): OBS weight updates on the layer-input Hessian."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch

from ..configuration import ColumnSweep, SparseGPTConfig
from ..parts import HessianStatistics, sparsegpt_prune_group
from .base import PruningAlgorithm
from .registry import Description

#: the mask score of the column sweep: the optimal-brain-surgeon loss of removing each weight
OBS_SCORE = Description(
    "mask score",
    "OBS saliency",
    "w_ij^2 / [H^-1]_jj on the layer-input Hessian, re-ranked as the sweep updates the weights",
    {},
    "sparsegpt",
)


class SparseGPTAlgorithm(PruningAlgorithm):
    """SparseGPT: one column sweep per shared-input group, masks chosen adaptively per block."""

    config_class: ClassVar[type[SparseGPTConfig]] = SparseGPTConfig
    config: SparseGPTConfig

    def new_statistic(self, in_features: int, num_languages: int, device: torch.device) -> HessianStatistics:
        return HessianStatistics(
            in_features,
            num_languages,
            device=device,
            token_stride=self.config.hessian_token_stride,
            dtype=self.statistics_dtype,
            sequence_group=self.sequence_group,
        )

    def mask_score(self) -> Description:
        return OBS_SCORE

    def weight_update(self) -> ColumnSweep:
        return self.config.weight_update

    def prune_group(self, name, weights, statistic, negative_statistic, sparsity):
        return sweep_group(name, weights, statistic, sparsity, self.config.nm_structure, self.weight_update())


def sweep_group(
    name: str,
    weights: list[torch.Tensor],
    statistic: HessianStatistics,
    sparsity: float,
    nm: tuple[int, int] | None,
    sweep: ColumnSweep,
) -> list[torch.Tensor]:
    """SparseGPT's column sweep over one shared-input group (SparseGPT, and M-Wanda's ``"sweep"``), with
    the settings of a resolved :class:`ColumnSweep`."""
    # The group's statistic is done: take H (freeing the accumulator) and let the sweep overwrite it.
    hessian = statistic.release_hessian()
    if not torch.isfinite(hessian).all():
        raise FloatingPointError(
            f"non-finite input activations reached {name}: its calibration Hessian holds NaN or inf"
        )
    in_features = hessian.shape[0]
    if statistic.count < in_features:
        # Fewer tokens than inputs leave H rank-deficient: only the dampening keeps the sweep defined, and on
        # Gemma 3 270M a 1/8-token sample of this kind lost a quarter of the quality (docs/mwanda.md, round 4).
        warnings.warn(
            f"{name}: the Hessian saw {statistic.count} tokens for {in_features} input features; add "
            "calibration data or lower hessian_token_stride",
            stacklevel=2,
        )
    device = hessian.device
    new_weights, _ = sparsegpt_prune_group(
        [w.to(device) for w in weights],
        hessian,
        sparsity,
        nm=nm,
        block_size=sweep.block_size,
        dampening=sweep.dampening,
        diagonal_dampening=sweep.diagonal_dampening,
        nm_selection=sweep.nm_selection,
        refinement_steps=sweep.refinement_steps,
        overwrite_hessian=True,
    )
    return new_weights
