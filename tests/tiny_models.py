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


# ---------------------------------------------------------------------------------------------------------
# Every causal LM of the installed transformers, shrunk to a tiny random model (the architecture sweep).

#: config field -> tiny value, applied to every config and sub-config that has the field
_TINY_SIZES: dict[str, int] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "hidden_dim", "model_dim"), 64),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "num_decoder_layers"), 2
    ),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "decoder_attention_heads", "n_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("head_dim", "attention_head_dim", "kv_channels"), 16),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "ffn_hidden_size", "d_ff"), 128
    ),
    **dict.fromkeys(
        ("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size"), 32
    ),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_top_k"), 2),
    **dict.fromkeys(
        ("index_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim"), 16
    ),
    **dict.fromkeys(("index_n_heads", "linear_num_heads", "linear_num_value_heads"), 4),
    "linear_num_key_heads": 2,
    "moe_k": 2,
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
}
#: fields that may default to None (derived at run time) yet must be set once the sizes above change
_TINY_WHEN_NONE = {
    "head_dim",
    "num_key_value_heads",
    "num_experts_per_tok",
    "n_routed_experts",
    "n_shared_experts",
}
#: field -> cap: only lowered when the default is larger
_TINY_CAPS: dict[str, int] = {
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_shared_experts": 1,
    "n_shared_experts": 1,
    "max_position_embeddings": 512,
    "n_positions": 512,
    "sliding_window": 16,
    "rotary_dim": 8,
    "state_size": 8,
    "mamba_d_state": 8,
    "ssm_state_size": 8,
    "mamba_dt_rank": 8,
    "time_step_rank": 8,
    "mamba_n_heads": 4,
    "mamba_head_dim": 16,
    "mamba_n_groups": 1,
    "n_groups": 1,
    "chunk_size": 16,
    "max_window_layers": 2,
    "num_kv_shared_layers": 0,
    "o_lora_rank": 16,
    "hidden_size_per_layer_input": 16,
    "mamba_d_head": 16,
    "mamba_chunk_size": 16,
}
#: feed-forward widths under other names: any int field naming one is capped at 128
_FFN_FIELDS = ("intermediate", "dim_ff", "dff", "d_inner", "mlp_dim", "ffn_hidden", "mamba_d_ssm", "emb_dim")
SWEEP_VOCAB = 320
#: calibration token ids stay below this; special token ids that are not are moved to the top of the vocab
SWEEP_TOKEN_RANGE = (3, 200)

#: the few model types that generic shrinking cannot build: config overrides (applied last)
SWEEP_OVERRIDES: dict[str, dict] = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    "reformer": {
        "is_decoder": True,
        "axial_pos_shape": [4, 4],
        "axial_pos_embds_dim": [32, 32],
        "attn_layers": ["local", "lsh"],
        "local_attn_chunk_length": 8,
        "lsh_attn_chunk_length": 8,
    },
    "zaya": {"num_experts_per_tok": 1},
    "jamba": {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1},
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    "kolibri1_1": {"kv_source_layers": [0, 1], "index_layers": [1], "mlp_only_layers": [0]},
}
#: model types that cannot be built offline from a tiny config, with the reason
SWEEP_SKIPS: dict[str, str] = {
    "gemma3n": "its vision tower is a timm model (timm is not installed)",
    "dots3_note": "heterogeneous per-layer configs (per_layer_config) not shrunk generically: 38M parameters",
    "dots3_note_text": "heterogeneous per-layer configs (per_layer_config) not shrunk generically: 38M parameters",
    "gemma4_assistant": "a draft model: its forward needs the main model's shared KV states",
    "gemma4_unified_assistant": "a draft model: its forward needs the main model's shared KV states",
    "musicgen": "its causal LM is the audio-codebook decoder: inputs are [batch * codebooks, length] codes",
    "musicgen_melody": "its causal LM is the audio-codebook decoder: inputs are [batch * codebooks, length] codes",
    "blt": "byte-latent patcher: four sub-configs coupled by hidden_size_global, not shrunk generically",
}


def _read(config, field: str):
    """A config field; heterogeneous configs (Gemma 4) refuse global reads of per-layer fields: the stored
    global value then."""
    try:
        return getattr(config, field, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return config.to_dict().get(field)


def _layer_selection(default) -> list[int] | None:
    """Which of the default config's layers the tiny one keeps: the first of each distinct layer type (so a
    hybrid keeps one layer of every kind), at least two."""
    for field in ("layer_types", "layers_block_type", "layers_type", "mlp_layer_types"):
        kinds = _read(default, field)
        if isinstance(kinds, list) and kinds and all(isinstance(k, str) for k in kinds):
            chosen = sorted({kinds.index(kind) for kind in kinds})
            extra = [i for i in range(len(kinds)) if i not in chosen]
            return sorted(chosen + extra[: max(0, 2 - len(chosen))])
    return None


def _tiny_per_layer(default, per_layer: dict, selection: list[int] | None, tiny: dict) -> dict:
    """Per-layer overrides (``{"05": {"head_dim": 512}}``) moved to the kept layers' indices, their sizes
    scaled like the global ones (a layer with twice the global head_dim keeps twice the tiny one)."""
    keep = selection if selection is not None else list(range(2))
    out = {}
    for key, values in per_layer.items():
        if not key.isdigit() or int(key) not in keep:
            continue
        scaled = {}
        for field, value in (values.to_dict() if hasattr(values, "to_dict") else dict(values)).items():
            base = _read(default, field)
            tiny_value = tiny.get(field, _TINY_SIZES.get(field))
            if tiny_value is None or not isinstance(value, int):
                scaled[field] = value
            elif isinstance(base, int) and base and value % base == 0 and value // base <= 4:
                scaled[field] = tiny_value * (value // base)
            else:
                scaled[field] = tiny_value
        out[str(keep.index(int(key))).zfill(len(key))] = scaled
    return out


def tiny_config(config_class, overrides: dict | None = None):
    """``config_class`` with every size shrunk (recursively into sub-configs), the special token ids moved
    inside the tiny vocabulary and per-layer lists cut to the kept layers."""
    from transformers import PretrainedConfig

    default = config_class()
    fields = default.to_dict()
    kwargs: dict = {}
    for field in fields:
        value = _read(default, field)
        if isinstance(value, bool):
            continue
        if field in _TINY_SIZES and (isinstance(value, int) or (value is None and field in _TINY_WHEN_NONE)):
            kwargs[field] = _TINY_SIZES[field]
        elif field in _TINY_CAPS and (
            (isinstance(value, int) and value > _TINY_CAPS[field])
            or (value is None and field in _TINY_WHEN_NONE)
        ):
            kwargs[field] = _TINY_CAPS[field]
        elif isinstance(value, int) and value > 128 and any(key in field for key in _FFN_FIELDS):
            kwargs[field] = 128 if field != "emb_dim" else 64
        elif field.startswith("vocab_size") and isinstance(value, int):
            kwargs[field] = SWEEP_VOCAB
        elif isinstance(value, PretrainedConfig):
            kwargs[field] = tiny_config(type(value)).to_dict()
    if "mamba_d_head" in kwargs and "mamba_n_heads" in fields:  # heads * head size = expand * hidden
        expand = _read(default, "mamba_expand") or 2
        kwargs["mamba_n_heads"] = kwargs.get("hidden_size", 64) * expand // kwargs["mamba_d_head"]
    if "qk_rope_head_dim" in kwargs and "head_dim" in fields:
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]  # multi-head latent attention ropes head_dim channels
    # Per-layer lists as long as the default stack: keep the entries of the kept layers.
    n_default = next(
        (
            _read(default, f)
            for f in fields
            if f in ("num_hidden_layers", "n_layer", "num_layers") and isinstance(_read(default, f), int)
        ),
        None,
    )
    selection = _layer_selection(default)
    if n_default and selection is not None:
        for field in fields:
            value = _read(default, field)
            if isinstance(value, list) and len(value) == n_default and field not in kwargs:
                kwargs[field] = [value[i] for i in selection]
        for field in ("num_hidden_layers", "n_layer", "num_layers"):
            if field in kwargs:
                kwargs[field] = len(selection)
    for field in fields:  # per-layer sizes (Gemma 3n's intermediate_size list)
        value = kwargs.get(field, _read(default, field))
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            if field in _TINY_SIZES:
                kwargs[field] = [_TINY_SIZES[field]] * len(value)
            elif any(key in field for key in _FFN_FIELDS):
                kwargs[field] = [min(v, 128) for v in value]
    per_layer = _read(default, "per_layer_config") if "per_layer_config" in fields else None
    if isinstance(per_layer, dict) and per_layer:
        kwargs["per_layer_config"] = _tiny_per_layer(default, per_layer, selection, kwargs)
    spare = SWEEP_VOCAB - 1
    for field in fields:
        if not field.endswith(("_token_id", "_token_index", "_token_ids")):
            continue
        value = _read(default, field)
        if isinstance(value, int) and not isinstance(value, bool) and value >= SWEEP_TOKEN_RANGE[1]:
            kwargs[field], spare = spare, spare - 1
        elif isinstance(value, list) and any(isinstance(v, int) and v >= SWEEP_TOKEN_RANGE[1] for v in value):
            kwargs[field] = [spare - i for i in range(len(value))]
            spare -= len(value)
    kwargs.update(overrides or {})
    return config_class(**kwargs)


def sweep_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def make_sweep_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``AutoModelForCausalLM`` of ``model_type`` (as a user would load it), in eval mode."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = tiny_config(CONFIG_MAPPING[model_type], SWEEP_OVERRIDES.get(model_type))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    languages = getattr(config, "languages", None)
    if hasattr(model, "set_default_language") and languages:  # X-MOD: one adapter per language
        model.set_default_language(languages[0])
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and param.is_floating_point():
                param.normal_(0.0, 0.2)
    return model.eval()
