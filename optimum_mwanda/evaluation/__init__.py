"""Evaluation: per-language perplexity, an ``evaluate`` metric, the calibration-language sweep and
downstream tasks through lm-evaluation-harness (``run_downstream``; the ``eval`` extra)."""

from __future__ import annotations

from typing import Any

from .harness import DownstreamResult, run_downstream
from .perplexity import LanguagePerplexity, PerplexityResult, evaluate_perplexity
from .sweep import SweepResult, calibration_language_sweep

__all__ = [
    "DownstreamResult",
    "LanguagePerplexity",
    "MultilingualPerplexity",
    "PerplexityResult",
    "SweepResult",
    "calibration_language_sweep",
    "evaluate_perplexity",
    "run_downstream",
]


def __getattr__(name: str) -> Any:
    # The metric imports `evaluate` and `datasets` (seconds); load them only when the metric is asked for.
    if name == "MultilingualPerplexity":
        from .metric import MultilingualPerplexity

        return MultilingualPerplexity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
