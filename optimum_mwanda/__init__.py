"""optimum-mwanda: one-shot pruning of multilingual causal language models."""

from ._lazy import lazy_attributes as _lazy_attributes
from .calibration import (
    CalibrationSet,
    build_calibration,
    default_calibration,
    load_bundled_corpus,
    translation_demonstrations,
)
from .configuration import MWandaConfig, PruningConfig, SparseGPTConfig, WandaConfig
from .evaluation import evaluate_perplexity
from .hub import load_pruned_model, verify_sparsity
from .modeling.coverage import CoveragePlan, IncompleteCoverageError
from .modeling.experts import ExpertOptions
from .pruner import Pruner
from .report import PruningReport
from .training import SparsityKeeper, merge_and_reprune, preserve_sparsity
from .version import __version__

__all__ = [
    "CalibrationSet",
    "CoveragePlan",
    "ExpertOptions",
    "IncompleteCoverageError",
    "MWandaConfig",
    "Pruner",
    "PruningConfig",
    "PruningReport",
    "SparseGPTConfig",
    "WandaConfig",
    "__version__",
    "build_calibration",
    "default_calibration",
    "load_bundled_corpus",
    "translation_demonstrations",
    "evaluate_perplexity",
    "load_pruned_model",
    "verify_sparsity",
    "SparsityKeeper",
    "SparsityPreservingCallback",
    "merge_and_reprune",
    "preserve_sparsity",
]


# SparsityPreservingCallback subclasses transformers.TrainerCallback, whose import takes seconds: load it
# on first use only, so `import optimum_mwanda` stays fast.
__getattr__ = _lazy_attributes(__name__, {"SparsityPreservingCallback": ".training"})
