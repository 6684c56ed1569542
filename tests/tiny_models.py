"""Tiny causal LMs built from configs (offline) and a tiny tokenizer, shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.deepseek_v3 import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.gpt_oss import GptOssConfig, GptOssForCausalLM
from transformers.models.llama4 import Llama4ForCausalLM, Llama4TextConfig
from transformers.models.mixtral import MixtralConfig, MixtralForCausalLM
from transformers.models.qwen2_moe import Qwen2MoeConfig, Qwen2MoeForCausalLM
from transformers.models.qwen3_moe import Qwen3MoeConfig, Qwen3MoeForCausalLM

VOCAB = 320
HIDDEN = 64
# The width of every tiny Llama-like decoder in the tests (grouped-query attention: 4 query heads, 2 KV
# heads); each config adds its layer count, vocabulary and architecture-specific fields.
TINY_DECODER = dict(hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def _configs() -> dict:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(**TINY_DECODER, num_hidden_layers=3, **common)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**TINY_DECODER, num_hidden_layers=2, **common)),
        "mistral": (
            MistralForCausalLM,
            MistralConfig(**TINY_DECODER, num_hidden_layers=2, sliding_window=16, **common),
        ),
        "gemma3": (
            Gemma3ForCausalLM,
            # One KV head and an explicit head_dim: Gemma 3's own layout, at the tiny width.
            Gemma3TextConfig(
                **dict(TINY_DECODER, num_key_value_heads=1),
                num_hidden_layers=3,
                head_dim=16,
                sliding_window=8,
                **common,
            ),
        ),
        "bloom": (BloomForCausalLM, BloomConfig(hidden_size=HIDDEN, n_layer=2, n_head=4, **common)),
        "gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **common)),
        "opt": (
            OPTForCausalLM,
            OPTConfig(
                hidden_size=HIDDEN,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                word_embed_proj_dim=HIDDEN,
                max_position_embeddings=128,
                **common,
            ),
        ),
    }


ARCHITECTURES = list(_configs())

# Tiny mixtures of experts, one per fused expert layout of transformers 5: gate/up concatenated [E, 2I, H]
# (Mixtral, Qwen3-MoE, DeepSeek-V3 with a shared expert and group routing, Qwen2-MoE with a gated shared
# expert), interleaved and transposed with biases [E, H, 2I] (GPT-OSS); Llama 4's experts are not of that
# family (no ``use_experts_implementation``) and its router is an nn.Linear.
MOE_EXPERTS = 8


def _moe_configs() -> dict:
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    width = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    return {
        "mixtral": (
            MixtralForCausalLM,
            MixtralConfig(
                **width, intermediate_size=32, num_local_experts=MOE_EXPERTS, num_experts_per_tok=2, **common
            ),
        ),
        "qwen3_moe": (
            Qwen3MoeForCausalLM,
            Qwen3MoeConfig(
                **width,
                intermediate_size=64,
                moe_intermediate_size=32,
                num_experts=MOE_EXPERTS,
                num_experts_per_tok=2,
                norm_topk_prob=True,
                head_dim=16,
                **common,
            ),
        ),
        "deepseek_v3": (
            DeepseekV3ForCausalLM,
            DeepseekV3Config(
                **width,
                intermediate_size=64,
                moe_intermediate_size=32,
                n_routed_experts=MOE_EXPERTS,
                num_experts_per_tok=2,
                n_shared_experts=1,
                n_group=2,
                topk_group=1,
                first_k_dense_replace=1,
                q_lora_rank=None,
                kv_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
                **common,
            ),
        ),
        "gpt_oss": (
            GptOssForCausalLM,
            GptOssConfig(
                **width,
                intermediate_size=32,
                num_local_experts=MOE_EXPERTS,
                num_experts_per_tok=2,
                head_dim=16,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention"],
                **common,
            ),
        ),
        "qwen2_moe": (
            Qwen2MoeForCausalLM,
            Qwen2MoeConfig(
                **width,
                intermediate_size=64,
                moe_intermediate_size=32,
                num_experts=MOE_EXPERTS,
                num_experts_per_tok=2,
                shared_expert_intermediate_size=32,
                **common,
            ),
        ),
        "llama4": (
            Llama4ForCausalLM,
            Llama4TextConfig(
                **width,
                intermediate_size=32,
                intermediate_size_mlp=64,
                num_local_experts=4,
                num_experts_per_tok=1,
                head_dim=16,
                **common,
            ),
        ),
    }


MOE_ARCHITECTURES = [name for name in _moe_configs() if name != "llama4"]


def make_moe_model(architecture: str = "mixtral", seed: int = 0) -> torch.nn.Module:
    """A tiny random mixture-of-experts causal LM (2 decoder layers, 8 experts, top-2 routing)."""
    model_class, config = _moe_configs()[architecture]
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.05)
    return model.eval()


def make_model(architecture: str = "llama", seed: int = 0) -> torch.nn.Module:
    model_class, config = _configs()[architecture]
    torch.manual_seed(seed)
    model = model_class(config)
    # Larger-than-default initial weights make activations (and so scores) less uniform, like real models.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model.eval()


def make_token_calibration(languages=("en", "de", "sw"), n: int = 4, seq_len: int = 24, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    # Different languages draw from different (overlapping) token ranges, like real scripts do.
    out = {}
    for i, lang in enumerate(languages):
        low = 3 + 60 * i
        out[lang] = torch.randint(low, low + 120, (n, seq_len), generator=generator)
    return out


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few sentences (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "Mbweha mwepesi wa kahawia anaruka juu ya mbwa mvivu.",
    ] * 10
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def text_corpus() -> dict[str, list[str]]:
    en = [f"Line {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(60)]
    de = [f"Zeile {i}: der schnelle braune Fuchs springt über den faulen Hund {i}." for i in range(60)]
    sw = [f"Mstari {i}: mbweha mwepesi anaruka juu ya mbwa mvivu {i}." for i in range(60)]
    return {"en": en, "de": de, "sw": sw}


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class LegacyExpert(torch.nn.Module):
    """One expert of the per-module layout of older transformers versions and remote code (w1, w2, w3)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, intermediate, bias=False)
        self.w3 = torch.nn.Linear(hidden, intermediate, bias=False)
        self.w2 = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class LegacySparseMoe(torch.nn.Module):
    """Top-2 routing over an ``nn.ModuleList`` of experts, as Mixtral's block was before transformers 5."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int = MOE_EXPERTS, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, num_experts, bias=False)
        self.experts = torch.nn.ModuleList(LegacyExpert(hidden, intermediate) for _ in range(num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        x = hidden_states.view(-1, hidden)
        weights = torch.softmax(self.gate(x).float(), dim=-1)
        weights, index = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = torch.nn.functional.one_hot(index, len(self.experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.experts):
            position, token = torch.where(mask[e])
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, position, None])
        return out.view(batch, length, hidden)


def make_legacy_moe_model(seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose MLPs are replaced by :class:`LegacySparseMoe` blocks (per-expert nn.Linear)."""
    model = make_model("llama", seed=seed)
    torch.manual_seed(seed + 1)
    for layer in model.model.layers:
        layer.mlp = LegacySparseMoe(HIDDEN, 32)
        with torch.no_grad():
            for param in layer.mlp.parameters():
                param.normal_(0.0, 0.2)
    return model.eval()
