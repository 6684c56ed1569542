"""Tiny pruned models, reports and a tokenizer for the hub tests (built in code: nothing is downloaded)."""

from __future__ import annotations

import re

import torch
from torch import nn

from optimum_mwanda import PruningReport

FIFTEEN_LANGUAGES = ["en", "de", "fr", "es", "ru", "zh", "ar", "hi", "sw", "yo", "tr", "vi", "id", "fi", "ur"]

#: a tiny Llama with its second decoder layer offloaded to disk
OFFLOAD_LAYER_1 = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}


def tiny_llama(seed: int = 0, layers: int = 2):
    from tiny_models import TINY_DECODER
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(
        **TINY_DECODER,
        num_hidden_layers=layers,
        vocab_size=256,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64, n_layer=layers, n_head=4, vocab_size=256, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return AutoModelForCausalLM.from_config(config).eval()


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / GPT-2 Conv1D modules inside the decoder layers."""
    found = {}
    for name, module in model.named_modules():
        if ".layers." in name or ".h." in name:
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                found[name] = module
    return found


def layer_schedule(n_layers: int, sparsity: float, layerwise: str) -> list[float]:
    """Uniform, or a plausible non-uniform schedule spread +/- 0.05 around the mean."""
    if layerwise == "uniform" or n_layers == 1:
        return [sparsity] * n_layers
    return [sparsity + o for o in torch.linspace(-0.05, 0.05, n_layers).tolist()]


@torch.no_grad()
def prune_by_magnitude(
    model: nn.Module, sparsity: float | list[float] = 0.5, nm: tuple[int, int] | None = None
) -> None:
    """Zero the smallest-magnitude weights of every output row (or keep the N largest of each M-group).

    ``sparsity`` may be a per-decoder-layer list.
    """
    for name, module in decoder_linears(model).items():
        conv1d = type(module).__name__ == "Conv1D"
        weight = module.weight.t() if conv1d else module.weight  # [out, in] view
        layer = int(re.search(r"\.(\d+)\.", name).group(1))
        fraction = sparsity[layer] if isinstance(sparsity, list) else sparsity
        if nm is None:
            k = int(weight.shape[1] * fraction)
            drop = weight.abs().argsort(dim=1)[:, :k]
            mask = torch.ones_like(weight, dtype=torch.bool).scatter_(1, drop, False)
        else:
            n, m = nm
            groups = weight.abs().reshape(weight.shape[0], -1, m)
            keep = groups.argsort(dim=-1, descending=True)[..., :n]
            mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(weight.shape)
        weight.mul_(mask)


def make_report(
    model: nn.Module,
    languages: list[str] | None = None,
    method: str = "mwanda",
    sparsity: float = 0.5,
    mask_structure: str = "unstructured",
    layerwise: str = "uniform",
    sources: dict[str, str] | None = None,
) -> PruningReport:
    """A report with the fields the real pruner fills, measured from ``model``'s weights."""
    from optimum_mwanda import MWandaConfig, SparseGPTConfig, WandaConfig

    languages = languages or ["en", "sw"]
    config_cls = {"mwanda": MWandaConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method]
    config = config_cls(sparsity=sparsity, mask_structure=mask_structure, layerwise=layerwise)
    module_sparsity, module_shapes = {}, {}
    for name, module in decoder_linears(model).items():
        weight = module.weight.t() if type(module).__name__ == "Conv1D" else module.weight
        module_sparsity[name] = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
        module_shapes[name] = list(weight.shape)
    n_layers = model.config.num_hidden_layers
    layer_sparsity = layer_schedule(n_layers, sparsity, layerwise)
    signal = [] if layerwise == "uniform" else [0.1 * (i + 1) for i in range(n_layers)]
    return PruningReport(
        method=method,
        config=config.to_dict(),
        target_sparsity=sparsity,
        layer_sparsity=layer_sparsity,
        module_sparsity=module_sparsity,
        module_shapes=module_shapes,
        languages=list(languages),
        token_counts={lang: 4096 + 128 * i for i, lang in enumerate(languages)},
        timings={"capture": 0.4, "statistics": 1.2, "pruning": 0.8, "total": 2.5},
        layerwise_signal=signal,
        calibration_sources=sources
        if sources is not None
        else {lang: "facebook/flores" for lang in languages},
        architecture=type(model).__name__,
    )


def tiny_tokenizer():
    """A byte-level BPE tokenizer with 256 byte tokens and no merges (vocab matches the tiny models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=alphabet[1], eos_token=alphabet[2])
