"""Calibration data: the calibration set, its builder, loaders and the bundled corpus."""

from .builder import build_calibration
from .dataset import CalibrationSet

__all__ = ["CalibrationSet", "build_calibration"]
