"""Evaluation: per-language perplexity, an ``evaluate`` metric, the calibration-language matrix and
downstream tasks through lm-evaluation-harness (``run_downstream``, lm-eval's own tasks on local data with
``task_data``; the ``eval`` extra)."""

from __future__ import annotations

from .._lazy import lazy_attributes as _lazy_attributes
from .harness import DownstreamResult, prepare_task_data, run_downstream
from .language_matrix import (
    LanguageMatrixResult,
    SweepResult,
    calibration_language_matrix,
    calibration_language_sweep,
)
from .local_data import MissingTaskData, TaskDataPlan
from .perplexity import LanguagePerplexity, PerplexityResult, evaluate_perplexity
from .summary import format_perplexity_table, geometric_mean

__all__ = [
    "DownstreamResult",
    "LanguagePerplexity",
    "MissingTaskData",
    "MultilingualPerplexity",
    "PerplexityResult",
    "LanguageMatrixResult",
    "SweepResult",
    "TaskDataPlan",
    "calibration_language_matrix",
    "calibration_language_sweep",
    "evaluate_perplexity",
    "format_perplexity_table",
    "geometric_mean",
    "prepare_task_data",
    "run_downstream",
]


# The metric imports `evaluate` and `datasets` (seconds); load them only when the metric is asked for.
__getattr__ = _lazy_attributes(__name__, {"MultilingualPerplexity": ".metric"})
