"""Evaluation: per-language perplexity, an ``evaluate`` metric, the calibration-language sweep and
downstream tasks through lm-evaluation-harness (``run_downstream``; the ``eval`` extra)."""

from __future__ import annotations

from .._lazy import lazy_attributes as _lazy_attributes
from .harness import DownstreamResult, run_downstream
from .perplexity import LanguagePerplexity, PerplexityResult, evaluate_perplexity
from .summary import format_perplexity_table, geometric_mean
from .sweep import SweepResult, calibration_language_sweep

__all__ = [
    "DownstreamResult",
    "LanguagePerplexity",
    "MultilingualPerplexity",
    "PerplexityResult",
    "SweepResult",
    "calibration_language_sweep",
    "evaluate_perplexity",
    "format_perplexity_table",
    "geometric_mean",
    "run_downstream",
]


# The metric imports `evaluate` and `datasets` (seconds); load them only when the metric is asked for.
__getattr__ = _lazy_attributes(__name__, {"MultilingualPerplexity": ".metric"})
