"""The prunable linear modules of a decoder layer and their weights as ``[out, in]`` matrices (and, with
:func:`prunable_weights_by_layer`, the per-expert matrices of fused mixture-of-experts tensors)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .experts import ExpertList, ExpertWeight, find_expert_lists, find_fused_experts, is_router
from .offload import execution_device, read_parameter, write_parameter

# Never pruned, whatever the user's patterns: output heads and embeddings.
ALWAYS_DENSE = ("lm_head", "embed", "wte", "wpe", "word_embeddings", "shared")


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D: a linear layer whose weight is stored [in, out].
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_prunable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def matches_pattern(name: str, patterns: list[str]) -> bool:
    """``fnmatch`` glob or plain substring match of a module name."""
    return any(fnmatch.fnmatchcase(name, p) or p in name for p in patterns)


@dataclass
class PrunableLinear:
    """A linear module to prune, with access to its weight in ``[out_features, in_features]`` orientation."""

    name: str
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return _is_conv1d(self.module)

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.module.weight.shape
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return execution_device(self.module)

    def read_weight(self) -> torch.Tensor:
        weight = read_parameter(self.module, "weight")
        return weight.t() if self.transposed else weight

    def write_weight(self, weight: torch.Tensor) -> None:
        write_parameter(self.module, "weight", weight.t() if self.transposed else weight)


def ancestors_of(layer: nn.Module, sub_name: str) -> list[nn.Module]:
    """The modules enclosing ``layer.<sub_name>`` inside ``layer``, innermost first (``layer`` excluded)."""
    parts = sub_name.split(".")[:-1]
    chain, module = [], layer
    for part in parts:
        module = getattr(module, part)
        chain.append(module)
    return chain[::-1]


def is_always_dense(sub_name: str) -> bool:
    return any(part in sub_name.split(".") for part in ALWAYS_DENSE)


@dataclass
class ListedExpertLinear(PrunableLinear):
    """A linear module of expert ``expert`` of an :class:`ExpertList`: it sees only the tokens routed to it."""

    expert_list: ExpertList | None = None
    expert: int = 0


def find_prunable_linears(layer: nn.Module, layer_name: str, ignore: list[str]) -> list[PrunableLinear]:
    """Linear (and Conv1D) modules inside ``layer`` not excluded by ``ignore``, always dense, nor a
    mixture-of-experts router or gate (routers decide which experts run: never pruned)."""
    found: list[PrunableLinear] = []
    experts = {
        id(e): (lst, i) for lst in find_expert_lists(layer, layer_name) for i, e in enumerate(lst.experts)
    }
    for sub_name, module in layer.named_modules():
        if not sub_name or not is_prunable_linear(module):
            continue
        full = f"{layer_name}.{sub_name}"
        if matches_pattern(full, ignore) or is_always_dense(sub_name):
            continue
        ancestors = ancestors_of(layer, sub_name)
        if is_router(sub_name, module, ancestors):
            continue
        owner = next((experts[id(a)] for a in ancestors if id(a) in experts), None)
        if owner is None:
            found.append(PrunableLinear(full, module))
        else:
            found.append(ListedExpertLinear(full, module, expert_list=owner[0], expert=owner[1]))
    return found


def find_expert_weights(layer: nn.Module, layer_name: str, ignore: list[str]) -> list[ExpertWeight]:
    """Every expert's matrices of the fused-experts modules inside ``layer`` not excluded by ``ignore``
    (matched against ``<experts>.<parameter>[<expert>]`` names and against ``<experts>.<parameter>``)."""
    found = []
    for experts in find_fused_experts(layer, layer_name):
        for weight in experts.weights():
            whole = f"{experts.name}.{weight.parameter}"
            if not (matches_pattern(weight.name, ignore) or matches_pattern(whole, ignore)):
                found.append(weight)
    return found


def prunable_linears_by_layer(stack, ignore: list[str]) -> list[list[PrunableLinear]]:
    """:func:`find_prunable_linears` of every decoder layer of ``stack`` (a :class:`DecoderStack`), in order."""
    return [find_prunable_linears(layer, stack.layer_name(i), ignore) for i, layer in enumerate(stack.layers)]


def prunable_weights_by_layer(stack, ignore: list[str]) -> list[list[PrunableLinear | ExpertWeight]]:
    """Per decoder layer: its prunable linear modules, then its experts' matrices (what the pruner prunes)."""
    return [
        [
            *find_prunable_linears(layer, stack.layer_name(i), ignore),
            *find_expert_weights(layer, stack.layer_name(i), ignore),
        ]
        for i, layer in enumerate(stack.layers)
    ]
