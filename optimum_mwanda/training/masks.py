"""Which weights of a pruned model are pruned: pure mask helpers and the discovery of the pruned modules.

A pruned weight is one that is exactly zero. The modules looked at are the ones the pruner prunes: the
Linear/Conv1D modules of the decoder layers (never the LM head or embeddings), minus ``ignore`` patterns.
Masks are kept in each parameter's own layout, so GPT-2 style ``Conv1D`` (``[in, out]``) needs no special case.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..modeling import find_decoder_stack, find_prunable_linears
from ..modeling.linear import matches_pattern

# peft wraps a target module in a tuner layer that keeps the original module as ``base_layer`` and adds
# adapter modules beside it (``lora_A``, ``lora_B``, ...). Only the base layer holds pruned weights.
BASE_LAYER = "base_layer"


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


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (adapter layers still injected), else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def canonical_name(name: str) -> str:
    """A module name without peft's ``base_layer`` components, i.e. its name in the unwrapped model."""
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)


def _inside_adapter(relative: str, tuner_layers: Sequence[str]) -> bool:
    """Whether ``relative`` names an adapter module (not the wrapped base layer) of one of ``tuner_layers``."""
    for prefix in tuner_layers:
        if relative.startswith(prefix + "."):
            rest = relative[len(prefix) + 1 :].split(".")
            if any(part != BASE_LAYER for part in rest):
                return True
    return False


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
    base = unwrap_adapters(model)
    stack = find_decoder_stack(base)
    found: dict[str, nn.Module] = {}
    for index, layer in enumerate(stack.layers):
        layer_name = stack.layer_name(index)
        tuner_layers = [
            name
            for name, module in layer.named_modules()
            if name and isinstance(getattr(module, BASE_LAYER, None), nn.Module)
        ]
        for linear in find_prunable_linears(layer, layer_name, []):
            relative = linear.name[len(layer_name) + 1 :]
            if _inside_adapter(relative, tuner_layers):
                continue
            name = canonical_name(linear.name)
            if matches_pattern(name, list(ignore)):
                continue
            found[name] = linear.module
    return found
