"""An offline ``evaluate`` metric for per-language perplexity.

``evaluate.load("perplexity")`` downloads a script from the Hub and takes a model *name*; this metric is a
plain class: construct it, then ``compute(predictions=texts, languages=codes, model=model,
tokenizer=tokenizer)`` (or ``add_batch`` several times, then ``compute(model=..., tokenizer=...)``).
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from .perplexity import evaluate_perplexity

_DESCRIPTION = """\
Perplexity of a causal language model on held-out text, reported separately for each language. The texts of
one language are joined, cut into windows of `seq_len` tokens (BOS prepended as unscored context) and the
perplexity is exp of the mean next-token negative log-likelihood over every scored token of that language.
`mean_perplexity` is the geometric mean over languages.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): held-out texts (the text to score, not model outputs).
    languages (`list[str]`): the language code of each text (ISO 639, e.g. "en", "deu_Latn").
    model: a transformers causal LM (required at compute time unless given to the constructor).
    tokenizer: its tokenizer (likewise).
    seq_len, stride, batch_size, max_windows, add_bos, show_progress: see
        `optimum_mwanda.evaluate_perplexity`.
Returns:
    perplexities (`dict[str, float]`): perplexity per language, in order of first appearance.
    mean_perplexity (`float`): geometric mean over languages.
    tokens (`dict[str, int]`): scored tokens per language.
Examples:
    >>> metric = MultilingualPerplexity()
    >>> metric.compute(predictions=["Hallo Welt.", "Hola mundo."], languages=["de", "es"],
    ...                model=model, tokenizer=tokenizer)  # doctest: +SKIP
    {'perplexities': {'de': ..., 'es': ...}, 'mean_perplexity': ..., 'tokens': {'de': ..., 'es': ...}}
"""

_CITATION = """\
@software{optimum_mwanda,
  title = {optimum-mwanda: one-shot pruning of multilingual causal language models},
}
"""

_PASSED_THROUGH = ("seq_len", "stride", "batch_size", "max_windows", "add_bos", "show_progress", "loss_impl")


class MultilingualPerplexity(evaluate.Metric):
    """Per-language perplexity as an ``evaluate.Metric`` that never touches the Hub.

    Args:
        model, tokenizer: defaults for :meth:`compute` (either may instead be passed there).
        keep_in_memory: keep added texts in memory rather than in an Arrow cache file (default ``True``).
        **kwargs: other ``evaluate.Metric`` arguments (``cache_dir``, ``experiment_id``, ...) and defaults for
            the perplexity settings (``seq_len``, ``stride``, ``batch_size``, ``max_windows``, ``add_bos``,
            ``show_progress``, ``loss_impl``).
    """

    def __init__(self, model=None, tokenizer=None, keep_in_memory: bool = True, **kwargs: Any):
        self._defaults = {name: kwargs.pop(name) for name in _PASSED_THROUGH if name in kwargs}
        self._model = model
        self._tokenizer = tokenizer
        super().__init__(keep_in_memory=keep_in_memory, **kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "languages": datasets.Value("string")}
            ),
            license="apache-2.0",
            reference_urls=["https://huggingface.co/docs/transformers/perplexity"],
        )

    def _compute(self, predictions, languages, model=None, tokenizer=None, **kwargs: Any) -> dict[str, Any]:
        model = model if model is not None else self._model
        tokenizer = tokenizer if tokenizer is not None else self._tokenizer
        if model is None or tokenizer is None:
            raise ValueError(
                "MultilingualPerplexity needs model= and tokenizer= (in compute or the constructor)"
            )
        unknown = sorted(set(kwargs) - set(_PASSED_THROUGH))
        if unknown:
            raise ValueError(
                f"unknown MultilingualPerplexity arguments {unknown}; known: {list(_PASSED_THROUGH)}"
            )
        if not predictions:
            raise ValueError("MultilingualPerplexity got no texts to score")
        texts: dict[str, list[str]] = {}
        for text, lang in zip(predictions, languages):
            texts.setdefault(lang, []).append(text)
        settings = {"show_progress": False, **self._defaults, **kwargs}
        result = evaluate_perplexity(model, tokenizer, texts, return_details=True, **settings)
        return {
            "perplexities": result.perplexities,
            "mean_perplexity": result.mean_perplexity,
            "tokens": result.tokens,
        }
