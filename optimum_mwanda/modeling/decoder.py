"""Finding the decoder layers of a causal LM: a small registry plus a generic fallback."""

from __future__ import annotations

from dataclasses import dataclass

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
    """Locate the decoder layers: the registry by ``config.model_type``, else the fallback search."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    path = DECODER_LAYERS_PATHS.get(model_type or "")
    layers = _get_by_path(model, path) if path else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        path, layers = _search_layer_list(model, _expected_num_layers(config))
    if layers is None:
        raise NoDecoderLayersError(
            f"could not find decoder layers in {type(model).__name__}: no nn.ModuleList of identical blocks. "
            "optimum-mwanda prunes transformer decoders (from_pretrained causal LMs)"
        )
    return DecoderStack(layers=layers, path=path)


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
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(text_config, attribute, None)
        if isinstance(value, int):
            return value
    return None


def _search_layer_list(model: nn.Module, expected: int | None) -> tuple[str, nn.ModuleList | None]:
    """The largest ModuleList of same-class blocks that contain linear layers (preferring ``expected`` long)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not any(
            isinstance(sub, nn.Linear) or type(sub).__name__ == "Conv1D" for sub in module[0].modules()
        ):
            continue
        rank = (2 if expected is not None and len(module) == expected else 1) * 10_000 + len(module)
        if best is None or rank > best[0]:
            best = (rank, name, module)
    if best is None:
        return "", None
    return best[1], best[2]
