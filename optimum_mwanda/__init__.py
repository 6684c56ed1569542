"""optimum-mwanda: one-shot pruning of multilingual causal language models.

The public names are imported on first use (PEP 562), so ``import optimum_mwanda`` and the command line's
``--help`` do not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes as _lazy_attributes
from .version import __version__

if TYPE_CHECKING:
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
    from .training import SparsityKeeper, SparsityPreservingCallback, merge_and_reprune, preserve_sparsity

#: Every public name and the module that defines it (relative to this package).
_SOURCES = {
    "CalibrationSet": ".calibration",
    "build_calibration": ".calibration",
    "default_calibration": ".calibration",
    "load_bundled_corpus": ".calibration",
    "translation_demonstrations": ".calibration",
    "MWandaConfig": ".configuration",
    "PruningConfig": ".configuration",
    "SparseGPTConfig": ".configuration",
    "WandaConfig": ".configuration",
    "evaluate_perplexity": ".evaluation",
    "load_pruned_model": ".hub",
    "verify_sparsity": ".hub",
    "CoveragePlan": ".modeling.coverage",
    "IncompleteCoverageError": ".modeling.coverage",
    "ExpertOptions": ".modeling.experts",
    "Pruner": ".pruner",
    "PruningReport": ".report",
    "SparsityKeeper": ".training",
    "SparsityPreservingCallback": ".training",
    "merge_and_reprune": ".training",
    "preserve_sparsity": ".training",
}

__all__ = [
    "__version__",
    "CalibrationSet",
    "build_calibration",
    "default_calibration",
    "load_bundled_corpus",
    "translation_demonstrations",
    "MWandaConfig",
    "PruningConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "evaluate_perplexity",
    "load_pruned_model",
    "verify_sparsity",
    "CoveragePlan",
    "IncompleteCoverageError",
    "ExpertOptions",
    "Pruner",
    "PruningReport",
    "SparsityKeeper",
    "SparsityPreservingCallback",
    "merge_and_reprune",
    "preserve_sparsity",
]

__getattr__ = _lazy_attributes(__name__, _SOURCES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
