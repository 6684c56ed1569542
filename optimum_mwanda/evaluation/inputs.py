"""Validation of evaluation inputs: language codes and held-out texts by language."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..calibration.languages import normalize_language_tag


def normalize_texts_by_language(
    texts_by_language: Mapping[str, Sequence[str] | str], what: str = "evaluation"
) -> dict[str, list[str]]:
    """Check ``{language: texts}`` and return it with blank texts removed.

    Language codes are checked like calibration tags (ISO 639, optional script/region: ``"de"``,
    ``"pt-BR"``, ``"deu_Latn"``) but kept as given, so results come back under the caller's keys; two keys
    naming the same language (``"de"`` and ``"DE"``) are an error. A single string per language is accepted as
    one text. Raises ``ValueError`` naming the language whose texts are missing or blank, and ``TypeError``
    for non-string texts.
    """
    if not isinstance(texts_by_language, Mapping):
        raise TypeError(
            f"{what} texts must be a mapping {{language: [texts]}}, got {type(texts_by_language).__name__}"
        )
    if not texts_by_language:
        raise ValueError(f"no {what} texts: give at least one language")
    cleaned: dict[str, list[str]] = {}
    canonical: dict[str, str] = {}
    for lang, texts in texts_by_language.items():
        tag = normalize_language_tag(lang)
        if tag in canonical:
            raise ValueError(
                f"{what} languages {canonical[tag]!r} and {lang!r} name the same language {tag!r}"
            )
        canonical[tag] = lang
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise TypeError(
                f"{what} texts for {lang!r} must be a list of strings, got {type(texts).__name__}"
            )
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"{what} texts for {lang!r} must be strings, got {type(text).__name__}")
        kept = [text for text in texts if text.strip()]
        if not kept:
            raise ValueError(
                f"{what} language {lang!r} has no text (its list is empty or only blank strings)"
            )
        cleaned[lang] = kept
    return cleaned
