"""SparseGPT (Frantar & Alistarh, 2023): OBS weight updates on the layer-input Hessian."""

from __future__ import annotations

from typing import ClassVar

import torch

from ..configuration import SparseGPTConfig
from ..methods import HessianStatistics, sparsegpt_prune_group
from .base import PruningAlgorithm


class SparseGPTAlgorithm(PruningAlgorithm):
    """SparseGPT: one column sweep per shared-input group, masks chosen adaptively per block."""

    config_class: ClassVar[type[SparseGPTConfig]] = SparseGPTConfig
    config: SparseGPTConfig

    def new_statistic(self, in_features: int, num_languages: int, device: torch.device) -> HessianStatistics:
        return HessianStatistics(in_features, num_languages, device=device)

    def prune_group(self, name, weights, statistic, negative_statistic, sparsity):
        if not torch.isfinite(statistic.hessian).all():
            raise FloatingPointError(
                f"non-finite input activations reached {name}: its calibration Hessian holds NaN or inf"
            )
        device = statistic.hessian.device
        new_weights, _ = sparsegpt_prune_group(
            [w.to(device) for w in weights],
            statistic.hessian,
            sparsity,
            nm=self.config.nm_structure,
            block_size=self.config.block_size,
            dampening=self.config.dampening,
        )
        return new_weights
