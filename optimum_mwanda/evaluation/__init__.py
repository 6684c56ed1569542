"""Evaluation: per-language perplexity, an ``evaluate`` metric and the calibration-language sweep."""

from __future__ import annotations

from typing import Any

from .perplexity import LanguagePerplexity, PerplexityResult, evaluate_perplexity
from .summary import format_perplexity_table, geometric_mean
from .sweep import SweepResult, calibration_language_sweep

__all__ = [
    "LanguagePerplexity",
    "MultilingualPerplexity",
    "PerplexityResult",
    "SweepResult",
    "calibration_language_sweep",
    "evaluate_perplexity",
    "format_perplexity_table",
    "geometric_mean",
]


def __getattr__(name: str) -> Any:
    # The metric imports `evaluate` and `datasets` (seconds); load them only when the metric is asked for.
    if name == "MultilingualPerplexity":
        from .metric import MultilingualPerplexity

        return MultilingualPerplexity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
