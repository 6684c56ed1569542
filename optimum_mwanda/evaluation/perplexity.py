"""Per-language perplexity of a causal LM on held-out text.

For each language the texts are joined with ``separator``, tokenized once (no special tokens), cut into
windows (:mod:`.windows`) and scored; the perplexity is ``exp`` of the token-weighted mean NLL over every
scored token of that language. See ``docs/evaluation.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..modeling import input_device
from ..preflight import check_sequence_length
from .inputs import normalize_texts_by_language
from .loss import DEFAULT_LOGITS_BUDGET, chunked_matches_full, summed_nll_chunked, summed_nll_full
from .summary import geometric_mean
from .windows import WindowSpan, plan_windows, window_batch, window_capacity

LossImpl = Literal["auto", "chunked", "full"]


@dataclass
class LanguagePerplexity:
    """Perplexity of one language: summed NLL (nats) over ``tokens`` scored tokens in ``windows`` windows."""

    language: str
    nll: float
    tokens: int
    windows: int

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_nll": self.mean_nll, "perplexity": self.perplexity}


@dataclass
class PerplexityResult:
    """Everything :func:`evaluate_perplexity` measured (``return_details=True``)."""

    languages: dict[str, LanguagePerplexity] = field(default_factory=dict)
    seq_len: int = 0
    stride: int | None = None
    add_bos: bool = True
    loss_impl: str = "chunked"
    seconds: float = 0.0

    @property
    def perplexities(self) -> dict[str, float]:
        return {lang: result.perplexity for lang, result in self.languages.items()}

    @property
    def tokens(self) -> dict[str, int]:
        return {lang: result.tokens for lang, result in self.languages.items()}

    @property
    def mean_perplexity(self) -> float:
        """Geometric mean over languages (:func:`~optimum_mwanda.evaluation.summary.geometric_mean`): a
        language with more text does not dominate, nor does the language with the largest perplexity."""
        return geometric_mean(self.perplexities.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexities": self.perplexities,
            "mean_perplexity": self.mean_perplexity,
            "languages": {lang: result.to_dict() for lang, result in self.languages.items()},
            "seq_len": self.seq_len,
            "stride": self.stride,
            "add_bos": self.add_bos,
            "loss_impl": self.loss_impl,
            "seconds": self.seconds,
        }


def evaluate_perplexity(
    model: torch.nn.Module,
    tokenizer,
    texts_by_language: Mapping[str, Sequence[str] | str],
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    add_bos: bool | None = True,
    show_progress: bool = True,
    return_details: bool = False,
    separator: str = "\n\n",
    loss_impl: LossImpl = "auto",
    logits_budget: int = DEFAULT_LOGITS_BUDGET,
) -> dict[str, float] | PerplexityResult:
    """Perplexity of ``model`` on held-out text, per language.

    Args:
        model: a causal LM (any device placement, including Accelerate ``device_map`` dispatch/offload).
        tokenizer: its tokenizer.
        texts_by_language: ``{language code: [texts]}``; a language's texts are joined with ``separator``.
        seq_len: tokens per model input, BOS included.
        stride: tokens between window starts. ``None``: non-overlapping windows. Smaller values give
            overlapping windows where only the new tokens are scored (sliding-window perplexity: more
            context per token, proportionally more compute).
        batch_size: windows per forward pass (windows of one language; the last short one is right-padded).
        max_windows: score at most this many windows per language (a quick estimate on long texts).
        add_bos: ``True``: prepend the tokenizer's BOS to each window as context (never scored); raises if the
            tokenizer has none. ``None``: prepend it when the tokenizer has one. ``False``: no BOS, so the
            first token of each non-overlapping window is context only.
        show_progress: show a tqdm bar over windows.
        return_details: return a :class:`PerplexityResult` (NLL, scored tokens and windows per language,
            timing) instead of ``{language: perplexity}``.
        separator: the string placed between consecutive texts of a language before tokenizing.
        loss_impl: ``"chunked"`` (decoder body, then the LM head over ``logits_budget``-sized chunks of
            scored positions), ``"full"`` (the model's own logits) or ``"auto"``: chunked after checking on
            the first batch that it matches the full logits, else full with a warning.
        logits_budget: logit elements per LM-head chunk (memory bound of the loss).

    Returns:
        ``{language: perplexity}`` in input order, or a :class:`PerplexityResult`.

    The last window of a language is usually shorter than ``seq_len``; it is kept (every token gets scored)
    and right-padded in its batch with ``attention_mask = 0`` and label ``-100``, so padding never counts.
    """
    if loss_impl not in ("auto", "chunked", "full"):
        raise ValueError(f"loss_impl must be 'auto', 'chunked' or 'full', got {loss_impl!r}")
    _check_positive("logits_budget", logits_budget)
    # Tokenize and plan everything first, so an unusable language fails before any forward pass.
    prepared = prepare_evaluation(
        tokenizer, texts_by_language, seq_len, stride, batch_size, max_windows, add_bos, separator
    )
    bos_token_id, streams, plans = prepared.bos_token_id, prepared.streams, prepared.plans
    pad_token_id = _pad_id(tokenizer)
    check_sequence_length(
        seq_len, getattr(model, "config", None), "seq_len", "lower seq_len (windows include the BOS token)"
    )

    device = input_device(model)
    was_training = model.training
    model.eval()
    result = PerplexityResult(
        seq_len=seq_len, stride=stride, add_bos=bos_token_id is not None, loss_impl=loss_impl
    )
    impl = loss_impl
    start = time.perf_counter()
    progress = tqdm(
        total=sum(len(plan) for plan in plans.values()),
        desc="perplexity",
        unit="window",
        disable=not show_progress,
    )
    try:
        for lang, plan in plans.items():
            progress.set_postfix_str(lang)
            nll_sum, token_count = 0.0, 0
            for first in range(0, len(plan), batch_size):
                spans = plan[first : first + batch_size]
                batch = [t.to(device) for t in window_batch(streams[lang], spans, bos_token_id, pad_token_id)]
                if impl == "auto":
                    impl = (
                        "chunked"
                        if chunked_matches_full(model, *batch, logits_budget=logits_budget)
                        else "full"
                    )
                scorer = summed_nll_chunked if impl == "chunked" else summed_nll_full
                nll, count = scorer(model, *batch, logits_budget=logits_budget)
                nll_sum += nll
                token_count += count
                progress.update(len(spans))
            result.languages[lang] = LanguagePerplexity(lang, nll_sum, token_count, len(plan))
    finally:
        progress.close()
        model.train(was_training)
    result.seconds = time.perf_counter() - start
    result.loss_impl = impl
    return result if return_details else result.perplexities


@dataclass
class PreparedEvaluation:
    """Tokenized held-out text and its window plan, per language."""

    bos_token_id: int | None
    streams: dict[str, torch.Tensor]
    plans: dict[str, list[WindowSpan]]


def prepare_evaluation(
    tokenizer,
    texts_by_language: Mapping[str, Sequence[str] | str],
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    add_bos: bool | None = True,
    separator: str = "\n\n",
) -> PreparedEvaluation:
    """Validate the settings and texts of :func:`evaluate_perplexity`, tokenize and plan the windows.

    Raises the errors :func:`evaluate_perplexity` would, without needing a model (the sweep calls it before
    pruning anything).
    """
    texts = normalize_texts_by_language(texts_by_language, what="evaluation")
    _check_positive("seq_len", seq_len, minimum=2)
    _check_positive("batch_size", batch_size)
    if stride is not None:
        _check_positive("stride", stride)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    if not isinstance(separator, str):
        raise TypeError(f"separator must be a string, got {type(separator).__name__}")
    bos_token_id = _resolve_bos(tokenizer, add_bos)
    capacity = window_capacity(seq_len, bos_token_id is not None)
    if stride is not None and stride > capacity:
        raise ValueError(f"stride must be at most {capacity} (tokens per window besides BOS), got {stride}")
    streams: dict[str, torch.Tensor] = {}
    plans: dict[str, list[WindowSpan]] = {}
    for lang, lang_texts in texts.items():
        ids = tokenizer(separator.join(lang_texts), add_special_tokens=False, verbose=False)["input_ids"]
        streams[lang] = torch.tensor(ids, dtype=torch.long)
        plans[lang] = plan_windows(len(ids), seq_len, stride, bos_token_id is not None, max_windows)
        if not plans[lang]:
            raise ValueError(
                f"evaluation language {lang!r} has {len(ids)} token(s): too few to score any"
                + ("" if bos_token_id is not None else " without a BOS token")
            )
    return PreparedEvaluation(bos_token_id, streams, plans)


def _resolve_bos(tokenizer, add_bos: bool | None) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        return bos
    if not isinstance(add_bos, bool):
        raise TypeError(f"add_bos must be True, False or None, got {add_bos!r}")
    if add_bos and bos is None:
        raise ValueError(
            f"add_bos=True but the tokenizer ({type(tokenizer).__name__}) has no BOS token: pass add_bos=False "
            "(or add_bos=None to prepend BOS only when there is one)"
        )
    return bos if add_bos else None


def _pad_id(tokenizer) -> int:
    # Pads are masked out and never scored, so any valid id will do.
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _check_positive(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
