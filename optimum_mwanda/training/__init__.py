"""Sparse fine-tuning: keep the weights a pruner zeroed at exactly zero while a model trains.

``SparsityKeeper`` / ``preserve_sparsity`` for custom loops, ``SparsityPreservingCallback`` for
``transformers.Trainer`` and ``merge_and_reprune`` for LoRA. See ``docs/finetuning.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes as _lazy_attributes
from .keeper import SparsityKeeper, preserve_sparsity
from .lora import merge_and_reprune
from .masks import find_pruned_modules

if TYPE_CHECKING:
    from .callback import SparsityPreservingCallback

__all__ = [
    "SparsityKeeper",
    "SparsityPreservingCallback",
    "find_pruned_modules",
    "merge_and_reprune",
    "preserve_sparsity",
]


# The callback subclasses transformers.TrainerCallback, whose import pulls in the whole Trainer stack
# (seconds); load it only when it is asked for.
__getattr__ = _lazy_attributes(__name__, {"SparsityPreservingCallback": ".callback"})
