"""Finding the decoder layers of a causal LM: a small registry plus a generic fallback."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> dotted path of the decoder-layer ModuleList. Anything else goes through the fallback.
DECODER_LAYERS_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "cohere": "model.layers",
    "cohere2": "model.layers",
    "phi3": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "bloom": "transformer.h",
    "xglm": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "falcon": "transformer.h",
}


class NoDecoderLayersError(ValueError):
    """The model has no recognisable stack of decoder layers."""


@dataclass
class DecoderStack:
    """Where the decoder layers are.

    Attributes:
        layers: the ``nn.ModuleList`` of decoder layers.
        path: dotted name of ``layers`` inside the full model (e.g. ``"model.layers"``).
    """

    layers: nn.ModuleList
    path: str

    def layer_name(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    """Locate the decoder layers: the registry by ``config.model_type``, else a search of the language model.

    The search looks inside the language model only (``model.get_decoder()``: a multimodal checkpoint loaded
    as a causal LM keeps its vision and audio towers dense) for the ``nn.ModuleList`` of blocks holding
    linear layers, as long as the config's layer count; hybrid stacks that mix block classes (attention and
    state-space layers, as in Jamba or Zamba) are one list. A model whose blocks are not modules but parallel
    lists of sub-blocks (XLM keeps ``attentions`` and ``ffns`` side by side) has no decoder layer to replay
    and is refused.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    path = DECODER_LAYERS_PATHS.get(model_type or "")
    layers = _get_by_path(model, path) if path else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        root_name, root = _language_model(model)
        path, layers = _search_layer_list(root, _expected_num_layers(config))
        if layers is None and root is not model:  # get_decoder() named something else (ModernBERT's head)
            root_name, root = "", model
            path, layers = _search_layer_list(root, _expected_num_layers(config))
        if layers is not None and root_name:
            path = f"{root_name}.{path}"
    if layers is None:
        raise NoDecoderLayersError(
            f"could not find decoder layers in {type(model).__name__}: no nn.ModuleList of blocks with linear "
            "layers. optimum-mwanda prunes transformer decoders (from_pretrained causal LMs)"
        )
    return DecoderStack(layers=layers, path=path)


def _language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The text decoder of ``model`` and its dotted name (``""``: the model itself)."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # some models raise rather than return None when they have no separate decoder
        decoder = None
    if isinstance(decoder, nn.Module) and decoder is not model:
        for name, module in model.named_modules():
            if module is decoder:
                return name, decoder
    return "", model


def _get_by_path(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _expected_num_layers(config) -> int | None:
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attribute in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = getattr(text_config, attribute, None)
        if isinstance(value, int):
            return value
    return None


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D" for sub in module.modules())


def _search_layer_list(model: nn.Module, expected: int | None) -> tuple[str, nn.ModuleList | None]:
    """The ModuleList of blocks with linear layers: ``expected`` long first, then the outermost, then the
    longest. Its blocks may differ in class (hybrid stacks)."""
    best: tuple[tuple[int, int, int], str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(_has_linear(child) for child in module):
            continue
        rank = (int(expected is not None and len(module) == expected), -name.count("."), len(module))
        if best is None or rank > best[0]:
            best = (rank, name, module)
    if best is None:
        return "", None
    _refuse_parallel_lists(model, best[1], best[2])
    return best[1], best[2]


def _refuse_parallel_lists(model: nn.Module, name: str, layers: nn.ModuleList) -> None:
    """Refuse a stack whose blocks are split across sibling lists (``attentions[i]`` then ``ffns[i]``): no
    single module is a decoder layer, so a layer cannot be replayed on its own inputs."""
    parent_name, _, _ = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    siblings = [
        f"{parent_name + '.' if parent_name else ''}{child_name}"
        for child_name, child in parent.named_children()
        if isinstance(child, nn.ModuleList) and child is not layers and len(child) == len(layers)
    ]
    if siblings:
        raise NoDecoderLayersError(
            f"{type(model).__name__} keeps each decoder block split across parallel lists ({name}, "
            + ", ".join(siblings)
            + ") rather than one module per layer: it cannot be pruned layer by layer"
        )


def matrix_rank(param: torch.Tensor) -> int:
    return sum(size > 1 for size in param.shape)


def is_matrix(param: torch.Tensor) -> bool:
    """A floating parameter with at least two dimensions longer than 1 (a learned ``[1, 1, H]`` token is a
    vector, not a matrix)."""
    return param.is_floating_point() and matrix_rank(param) >= 2
