"""Calibration data: the calibration set, its builder, loaders, translation demonstrations, bundled corpus."""

from .builder import allocate_sequences, build_calibration, default_calibration, resolve_calibration
from .corpus import available_languages, bundled_corpus_sources, load_bundled_corpus
from .dataset import CalibrationSet
from .languages import language_name, normalize_language_tag
from .loaders import (
    HUB_CORPORA,
    load_culturax,
    load_dataset_texts,
    load_fineweb2,
    load_flores,
    load_hub_texts,
    load_local_texts,
    load_mc4,
    load_wikipedia,
)
from .translation import translation_demonstrations

__all__ = [
    "HUB_CORPORA",
    "CalibrationSet",
    "allocate_sequences",
    "available_languages",
    "build_calibration",
    "bundled_corpus_sources",
    "default_calibration",
    "language_name",
    "load_bundled_corpus",
    "load_culturax",
    "load_dataset_texts",
    "load_fineweb2",
    "load_flores",
    "load_hub_texts",
    "load_local_texts",
    "load_mc4",
    "load_wikipedia",
    "normalize_language_tag",
    "resolve_calibration",
    "translation_demonstrations",
]
