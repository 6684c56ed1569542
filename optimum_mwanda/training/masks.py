"""Which weights of a pruned model are pruned: pure mask helpers and the discovery of the pruned modules.

A pruned weight is one that is exactly zero. The modules looked at are the ones the pruner prunes: the
Linear/Conv1D modules of the decoder layers (never the LM head or embeddings), minus ``ignore`` patterns.
Masks are kept in each parameter's own layout, so GPT-2 style ``Conv1D`` (``[in, out]``) needs no special case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..modeling.adapters import prunable_base_linears, unwrap_adapters

__all__ = ["count_revived", "find_pruned_modules", "pruned_mask", "unwrap_adapters", "zero_masked_"]


def pruned_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask, ``True`` where ``weight`` is exactly zero (the positions a pruner removed)."""
    return weight.detach() == 0


def count_revived(weight: torch.Tensor, mask: torch.Tensor) -> int:
    """How many positions selected by ``mask`` no longer hold an exact zero in ``weight``."""
    return int(torch.count_nonzero(weight.detach()[mask.to(weight.device)]))


def zero_masked_(weight: torch.Tensor, mask: torch.Tensor) -> None:
    """Set ``weight`` to exactly zero where ``mask`` is ``True``, in place and outside autograd."""
    with torch.no_grad():
        weight.masked_fill_(mask.to(weight.device), 0)


def find_pruned_modules(model: nn.Module, ignore: Sequence[str] = ()) -> dict[str, nn.Module]:
    """The modules a pruner may have pruned, by the name they have in the plain (unwrapped) model.

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        ignore: module-name globs or substrings to leave out (as in ``PruningConfig.ignore``).

    Returns:
        ``{name: module}`` for every decoder-layer Linear/Conv1D module holding a ``weight``; for peft models the
        wrapped base layers, never the adapters.

    Raises:
        optimum_mwanda.modeling.NoDecoderLayersError: (a ``ValueError``) the model has no decoder layers.
    """
    _, by_layer = prunable_base_linears(model, ignore)
    return {linear.name: linear.module for modules in by_layer for linear in modules}
