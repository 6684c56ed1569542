"""optimum-mwanda: one-shot pruning of multilingual causal language models."""

from .calibration import CalibrationSet, build_calibration
from .configuration import MWandaConfig, PruningConfig, SparseGPTConfig, WandaConfig
from .pruner import Pruner
from .report import PruningReport
from .version import __version__

__all__ = [
    "CalibrationSet",
    "MWandaConfig",
    "Pruner",
    "PruningConfig",
    "PruningReport",
    "SparseGPTConfig",
    "WandaConfig",
    "__version__",
    "build_calibration",
]
