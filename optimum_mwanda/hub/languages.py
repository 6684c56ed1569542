"""Offline validation of language codes for model-card metadata (ISO 639-1, 639-2/B, 639-3), via pycountry.

Calibration languages are often tagged with a locale or script (``"pt-BR"``, ``"zh_Hans"``, FLORES-style
``"swh_Latn"``); the Hub's ``language:`` field wants the bare ISO 639 code, so the primary subtag is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

_TAG = re.compile(r"^([A-Za-z]{2,3})(?:[-_][A-Za-z0-9]{2,8})*$")


@dataclass(frozen=True)
class Language:
    """A validated language: ``code`` as given (lower-cased primary subtag), its English ``name``."""

    tag: str
    code: str
    name: str


@cache
def _lookup(code: str) -> str | None:
    import pycountry

    languages = pycountry.languages
    record = None
    if len(code) == 2:
        record = languages.get(alpha_2=code)
    else:
        record = languages.get(alpha_3=code) or languages.get(bibliographic=code)
        if record is None:
            # ISO 639-2 collective codes (e.g. "sai") live in pycountry's ISO 639-5 table.
            record = pycountry.language_families.get(alpha_3=code)
    if record is None:
        return None
    # "Swahili (macrolanguage)" / "Swahili (individual language)": the code column already tells them apart.
    return re.sub(r" \((macrolanguage|individual language)\)$", "", record.name)


def _display_name(tag: str, code: str, iso_name: str) -> str:
    # The calibration module's names know script variants ("zh-Hans": "Simplified Chinese").
    from ..calibration.languages import LANGUAGE_NAMES

    return LANGUAGE_NAMES.get(tag) or LANGUAGE_NAMES.get(code) or iso_name


def resolve_language(tag: str) -> Language:
    """Validate ``tag`` and return its ISO code and English name; ``ValueError`` naming the tag otherwise."""
    if not isinstance(tag, str):
        raise TypeError(f"a language code must be a string, got {type(tag).__name__}")
    match = _TAG.match(tag.strip())
    if match is None:
        raise ValueError(
            f"invalid language code {tag!r}: expected an ISO 639 code such as 'en', 'swa' or 'pt-BR'"
        )
    code = match.group(1).lower()
    name = _lookup(code)
    if name is None:
        raise ValueError(f"invalid language code {tag!r}: {code!r} is not an ISO 639-1, 639-2 or 639-3 code")
    return Language(tag=tag, code=code, name=_display_name(tag.strip(), code, name))


def resolve_languages(tags: list[str]) -> list[Language]:
    """Validate every tag (all errors reported together) and drop repeated ISO codes, keeping order."""
    resolved, errors = [], []
    for tag in tags:
        try:
            resolved.append(resolve_language(tag))
        except (ValueError, TypeError) as err:
            errors.append(str(err))
    if errors:
        raise ValueError("; ".join(errors))
    return resolved
