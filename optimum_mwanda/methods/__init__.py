"""Pruning methods: one object per method, chosen from the config by :func:`algorithm_for`.

Adding a method means one new module with a :class:`PruningAlgorithm` subclass (and its config class in
``configuration.py``) plus one line in :data:`ALGORITHMS`.
"""

from __future__ import annotations

from ..configuration import PruningConfig
from .base import PruningAlgorithm
from .mwanda import MWandaAlgorithm
from .sparsegpt import SparseGPTAlgorithm
from .wanda import WandaAlgorithm

#: config class -> algorithm class; looked up by exact type, so subclassed configs (M-Wanda's config
#: extends Wanda's) get their own algorithm.
ALGORITHMS: dict[type[PruningConfig], type[PruningAlgorithm]] = {
    algorithm.config_class: algorithm for algorithm in (WandaAlgorithm, MWandaAlgorithm, SparseGPTAlgorithm)
}


def algorithm_for(config: PruningConfig) -> PruningAlgorithm:
    """The algorithm object that prunes with ``config``."""
    try:
        algorithm = ALGORITHMS[type(config)]
    except KeyError:
        known = ", ".join(cls.__name__ for cls in ALGORITHMS)
        raise TypeError(f"no pruning algorithm for {type(config).__name__}; use one of {known}") from None
    return algorithm(config)


__all__ = [
    "ALGORITHMS",
    "MWandaAlgorithm",
    "PruningAlgorithm",
    "SparseGPTAlgorithm",
    "WandaAlgorithm",
    "algorithm_for",
]
