"""The Pruner: validate, calibrate, prune decoder layer by decoder layer, report."""

from __future__ import annotations

from .configuration import PruningConfig
from .report import PruningReport


class Pruner:
    """Prunes a causal LM in place with the method its config names (work in progress)."""

    def __init__(self, config: PruningConfig):
        if not isinstance(config, PruningConfig):
            raise TypeError("Pruner needs a WandaConfig, SparseGPTConfig or MWandaConfig")
        self.config = config
        self.report: PruningReport | None = None

    def prune_model(self, model, calibration, tokenizer=None, negative_calibration=None) -> PruningReport:
        raise NotImplementedError
