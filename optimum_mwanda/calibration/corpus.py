"""The bundled multilingual sample corpus (the default calibration text when a user gives none).

Built by ``scripts/build_corpus.py`` from *The Debian Administrator's Handbook* (Debian package
``debian-handbook``; GPL-2.0+ or CC-BY-SA-3.0) and the Swahili user interface of Kolibri (PyPI ``kolibri``;
MIT); see ``data/LICENSES.md`` and ``data/manifest.json``. Every language has a calibration part and a
held-out part (for perplexity) that never overlap.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from .languages import normalize_language_tag

SPLITS = ("calibration", "heldout")


def _data_dir():
    return resources.files("optimum_mwanda.calibration").joinpath("data")


@lru_cache(maxsize=1)
def bundled_corpus_manifest() -> dict[str, Any]:
    """The corpus manifest: per language its source, package version and line/character counts per part."""
    manifest_file = _data_dir().joinpath("manifest.json")
    if not manifest_file.is_file():
        raise FileNotFoundError(
            "the bundled corpus is missing (optimum_mwanda/calibration/data/manifest.json); "
            "rebuild it with `python scripts/build_corpus.py`"
        )
    return json.loads(manifest_file.read_text(encoding="utf-8"))


def available_languages() -> list[str]:
    """Language codes (ISO 639-1) of the bundled corpus, sorted."""
    return sorted(bundled_corpus_manifest()["languages"])


def bundled_corpus_sources() -> dict[str, str]:
    """``{language: source}``, e.g. ``"The Debian Administrator's Handbook (debian-handbook 11.20220922)"``.

    Suitable for :attr:`CalibrationSet.sources`, reports and model cards.
    """
    return {
        lang: f"{entry['source']} ({entry['package']} {entry['package_version']})"
        for lang, entry in sorted(bundled_corpus_manifest()["languages"].items())
    }


def _resolve_languages(languages: str | Sequence[str] | None) -> list[str]:
    available = available_languages()
    if languages is None:
        return available
    if isinstance(languages, str):
        languages = [languages]
    requested = list(dict.fromkeys(normalize_language_tag(lang) for lang in languages))
    if not requested:
        raise ValueError(f"languages is empty: pick some of the bundled languages {available}")
    unknown = [lang for lang in requested if lang not in available]
    if unknown:
        raise ValueError(
            f"the bundled corpus has no language {', '.join(map(repr, unknown))}; available: {', '.join(available)}"
        )
    return requested


def load_bundled_corpus(
    split: str = "calibration", languages: str | Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Load the bundled sample corpus.

    Args:
        split: ``"calibration"`` (text to calibrate on) or ``"heldout"`` (text to measure perplexity on; it
            never overlaps the calibration part).
        languages: a language code or a list of them (default: every bundled language, sorted). An unknown
            code raises ``ValueError`` listing the available ones.

    Returns:
        ``{language: [paragraph, ...]}`` in the order of ``languages``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    corpus: dict[str, list[str]] = {}
    for lang in _resolve_languages(languages):
        text = _data_dir().joinpath(split, f"{lang}.txt").read_text(encoding="utf-8")
        corpus[lang] = [line for line in text.split("\n") if line.strip()]
    return corpus
