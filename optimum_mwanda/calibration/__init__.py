"""Calibration data: the calibration set, its builder, loaders, translation demonstrations, bundled corpus.

The names are imported on first use (PEP 562): ``languages`` (standard library only) must stay importable
without torch, for the command line's argument checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_attributes as _lazy_attributes

if TYPE_CHECKING:
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

_SOURCES = {
    "allocate_sequences": ".builder",
    "build_calibration": ".builder",
    "default_calibration": ".builder",
    "resolve_calibration": ".builder",
    "available_languages": ".corpus",
    "bundled_corpus_sources": ".corpus",
    "load_bundled_corpus": ".corpus",
    "CalibrationSet": ".dataset",
    "language_name": ".languages",
    "normalize_language_tag": ".languages",
    "HUB_CORPORA": ".loaders",
    "load_culturax": ".loaders",
    "load_dataset_texts": ".loaders",
    "load_fineweb2": ".loaders",
    "load_flores": ".loaders",
    "load_hub_texts": ".loaders",
    "load_local_texts": ".loaders",
    "load_mc4": ".loaders",
    "load_wikipedia": ".loaders",
    "translation_demonstrations": ".translation",
}

__all__ = [
    "allocate_sequences",
    "build_calibration",
    "default_calibration",
    "resolve_calibration",
    "available_languages",
    "bundled_corpus_sources",
    "load_bundled_corpus",
    "CalibrationSet",
    "language_name",
    "normalize_language_tag",
    "HUB_CORPORA",
    "load_culturax",
    "load_dataset_texts",
    "load_fineweb2",
    "load_flores",
    "load_hub_texts",
    "load_local_texts",
    "load_mc4",
    "load_wikipedia",
    "translation_demonstrations",
]

__getattr__ = _lazy_attributes(__name__, _SOURCES)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCES))
