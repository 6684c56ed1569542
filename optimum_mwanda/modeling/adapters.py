"""peft (LoRA) models: which of their modules hold the base weights, and whether pruning them is sound.

peft wraps each target module in a *tuner layer* that keeps the original module as ``base_layer`` and adds
adapter modules beside it (``lora_A``, ``lora_B``, ...). Only the base layers hold the model's weights: the
adapters are never pruned, and a module is named as in the plain model (``...q_proj``, not
``...q_proj.base_layer``), so that reports, ``ignore`` patterns and masks line up with the merged model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .decoder import DecoderStack, find_decoder_stack
from .linear import PrunableLinear, find_prunable_linears, matches_pattern

BASE_LAYER = "base_layer"
MERGE_HINT = (
    "merge the adapters first (model = model.merge_and_unload()) and prune the merged model; to fine-tune a "
    "pruned model with LoRA, prune the plain model, then attach the adapters and merge them with "
    "optimum_mwanda.merge_and_reprune, which keeps the pruned zeros"
)


def unwrap_adapters(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (adapter layers still injected), else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def canonical_name(name: str) -> str:
    """A module name without peft's ``base_layer`` components, i.e. its name in the unwrapped model."""
    return ".".join(part for part in name.split(".") if part != BASE_LAYER)


def is_tuner_layer(module: nn.Module) -> bool:
    """A peft tuner layer: a module that wraps a ``base_layer`` (duck-typed, so peft stays optional)."""
    return isinstance(getattr(module, BASE_LAYER, None), nn.Module)


def inside_adapter(relative: str, tuner_layers: Sequence[str]) -> bool:
    """Whether ``relative`` names an adapter module (not the wrapped base layer) of one of ``tuner_layers``."""
    for prefix in tuner_layers:
        if relative.startswith(prefix + "."):
            rest = relative[len(prefix) + 1 :].split(".")
            if any(part != BASE_LAYER for part in rest):
                return True
    return False


def prunable_base_linears(
    model: nn.Module, ignore: Sequence[str]
) -> tuple[DecoderStack, list[list[PrunableLinear]]]:
    """The decoder stack of ``model`` (unwrapped from peft) and the prunable linear modules of each layer.

    In a peft model these are the base layers, named as in the plain model; adapter modules are left out,
    and ``ignore`` patterns match the plain names.
    """
    base = unwrap_adapters(model)
    stack = find_decoder_stack(base)
    patterns = list(ignore)
    by_layer: list[list[PrunableLinear]] = []
    for index, layer in enumerate(stack.layers):
        layer_name = stack.layer_name(index)
        tuners = [name for name, module in layer.named_modules() if name and is_tuner_layer(module)]
        modules = []
        for linear in find_prunable_linears(layer, layer_name, []):
            if tuners and inside_adapter(linear.name[len(layer_name) + 1 :], tuners):
                continue
            name = canonical_name(linear.name)
            if matches_pattern(name, patterns):
                continue
            modules.append(dataclasses.replace(linear, name=name))  # keeps experts' own type
        by_layer.append(modules)
    return stack, by_layer


def check_adapters(model: nn.Module) -> None:
    """Refuse a peft model whose adapters make pruning the base weights unsound.

    Pruning the base layers of a LoRA model is sound while every adapter's update ``B @ A`` is zero (freshly
    attached adapters: peft initialises ``B`` to zero), so that the merged model holds exactly the pruned
    zeros. Refused, with what to do instead: trained adapters (a dense update the masks would not see),
    adapters merged into the base weights (unmerging would fill the pruned zeros), and other tuner types.
    """
    base = unwrap_adapters(model)
    trained, merged, other = [], [], []
    for name, module in base.named_modules():
        if not is_tuner_layer(module):
            continue
        if getattr(module, "merged_adapters", None):
            merged.append(name)
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_b, nn.ModuleDict):
            other.append(f"{name} ({type(module).__name__})")
            continue
        tensors = [p for p in lora_b.parameters()]
        embedding_b = getattr(module, "lora_embedding_B", None)
        if isinstance(embedding_b, nn.ParameterDict):
            tensors += list(embedding_b.values())
        if any(bool(torch.count_nonzero(t.detach())) for t in tensors if t.device.type != "meta"):
            trained.append(name)
    problems = []
    if merged:
        problems.append(f"adapters are merged into the base weights of {_some(merged)}")
    if trained:
        problems.append(f"the LoRA adapters of {_some(trained)} are trained (lora_B is not zero)")
    if other:
        problems.append(f"{_some(other)} use a tuner other than LoRA")
    if problems:
        raise ValueError(
            "this peft model cannot be pruned as it is: "
            + "; ".join(problems)
            + ". Pruning the base weights would choose masks for weights the merged model does not have: "
            + MERGE_HINT
        )


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
