"""Summed next-token negative log-likelihood of causal LMs, without materialising full-vocabulary logits.

With a 262k-token vocabulary (Gemma 3) the logits of one 512-token window are 512 MB in float32, and the
stock ``model(labels=...)`` loss copies them twice more (upcast, log-softmax). Here the decoder body runs
once, the hidden states of the scored positions are gathered, and the LM head is applied to a bounded
number of tokens at a time, each chunk reduced to its NLL in float32 (``logsumexp - target logit``) before the next.
"""

from __future__ import annotations

import math
import warnings

import torch

from .windows import IGNORE_INDEX

DEFAULT_LOGITS_BUDGET = 1 << 25
"""Logit elements per chunk (32M floats = 128 MB): 128 tokens of a 262k vocabulary, 1024 of a 32k one."""


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row ``-log softmax(logits)[target] = logsumexp(l) - l[target]``, computed in float32.

    ``logits``: ``[n, vocab]``; ``targets``: ``[n]``. Returns ``[n]`` float32. ``cross_entropy`` is the fused
    (single-pass log-softmax) form of exactly this.
    """
    return torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="none")


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, targets)``: which positions ``t`` predict a scored token ``labels[:, t + 1]``, and those tokens.

    ``keep`` is ``[batch, len - 1]`` boolean; ``targets`` the 1-D scored token ids in row-major order.
    """
    following = labels[:, 1:]
    keep = following != IGNORE_INDEX
    return keep, following[keep]


def chunk_size_for(vocab_size: int, logits_budget: int = DEFAULT_LOGITS_BUDGET) -> int:
    """Tokens per LM-head chunk so one chunk's logits hold at most ``logits_budget`` elements (at least 1)."""
    return max(1, logits_budget // max(1, vocab_size))


def logit_transform(model: torch.nn.Module):
    """The element-wise map a causal LM applies between its LM head and the loss, as a function.

    Covers final-logit soft-capping (Gemma 2/3), ``logit_scale`` (Cohere) and ``logits_scaling`` (Granite).
    Anything else is caught by :func:`chunked_matches_full`, which compares both paths once per run.
    """
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text_config = get_text() if callable(get_text) else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)  # Cohere keeps its multiplier on the model itself
    divisor = getattr(text_config, "logits_scaling", None)

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return transform


def decoder_body(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformer body that returns hidden states (``model.model`` for Llama-likes), or ``None``."""
    body = getattr(model, "base_model", None)
    if body is None or body is model or model.get_output_embeddings() is None:
        return None
    return body


@torch.inference_mode()
def summed_nll_chunked(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    logits_budget: int = DEFAULT_LOGITS_BUDGET,
) -> tuple[float, int]:
    """``(sum of NLL over scored tokens, scored token count)`` via the body, then the head in chunks."""
    body = decoder_body(model)
    if body is None:
        raise ValueError(
            f"{type(model).__name__} has no separate decoder body and LM head; use the full path"
        )
    head = model.get_output_embeddings()
    outputs = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
    keep, targets = shifted_targets(labels)
    # Gather only positions whose next token is scored: BOS-only, context and padding rows never reach the head.
    selected = hidden[:, :-1][keep.to(hidden.device)]
    transform = logit_transform(model)
    vocab_size = getattr(head, "out_features", None) or head.weight.shape[0]
    step = chunk_size_for(vocab_size, logits_budget)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, selected.shape[0], step):
        logits = transform(head(selected[start : start + step]).float())
        total += nll_from_logits(logits, targets[start : start + step]).double().sum().cpu()
    return float(total), int(targets.numel())


@torch.inference_mode()
def summed_nll_full(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    logits_budget: int = DEFAULT_LOGITS_BUDGET,
) -> tuple[float, int]:
    """Same as :func:`summed_nll_chunked` from the model's own full logits (any causal LM)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    keep, targets = shifted_targets(labels)
    selected = logits[:, :-1][keep.to(logits.device)]
    step = chunk_size_for(selected.shape[-1], logits_budget)
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, selected.shape[0], step):
        total += (
            nll_from_logits(selected[start : start + step], targets[start : start + step])
            .double()
            .sum()
            .cpu()
        )
    return float(total), int(targets.numel())


def chunked_matches_full(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    logits_budget: int = DEFAULT_LOGITS_BUDGET,
) -> bool:
    """Whether the chunked path reproduces the model's own logits on one batch (mean NLL within 1e-3 rel.).

    Half-precision models differ from themselves by ~1e-3 between kernels, hence the tolerance; an
    unsupported logit transform changes the mean NLL by far more.
    """
    if decoder_body(model) is None:
        return False
    fast, count = summed_nll_chunked(model, input_ids, attention_mask, labels, logits_budget)
    slow, _ = summed_nll_full(model, input_ids, attention_mask, labels, logits_budget)
    if count == 0:
        return True
    fast, slow = fast / count, slow / count
    if not (math.isfinite(fast) and math.isfinite(slow)):
        return math.isfinite(fast) == math.isfinite(slow)
    if abs(fast - slow) <= 1e-3 * max(1.0, abs(slow)):
        return True
    warnings.warn(
        f"the chunked loss of {type(model).__name__} differs from its own logits (mean NLL {fast:.5f} vs "
        f"{slow:.5f}); falling back to full logits (slower, more memory)",
        RuntimeWarning,
        stacklevel=3,
    )
    return False
