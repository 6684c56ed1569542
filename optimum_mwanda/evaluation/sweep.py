"""Deprecated module: the calibration-language matrix is :mod:`optimum_mwanda.evaluation.language_matrix`."""

from __future__ import annotations

import warnings

from .language_matrix import (  # noqa: F401
    DENSE_ROW,
    LanguageMatrixResult,
    SweepResult,
    calibration_language_matrix,
    calibration_language_sweep,
)

warnings.warn(
    "optimum_mwanda.evaluation.sweep is deprecated: use optimum_mwanda.evaluation.language_matrix",
    DeprecationWarning,
    stacklevel=2,
)
