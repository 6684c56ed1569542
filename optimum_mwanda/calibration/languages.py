"""Language tags, the one place the package validates them: BCP-47 via ``langcodes``, English display names,
ISO 639 codes for model-card metadata, and the ISO 639-3 + script codes of Hub corpora.

Every part of the package (calibration sets, loaders, evaluation, model cards, the CLI) calls
:func:`normalize_language_tag`, so ``"en"``, ``"EN"`` and ``"eng"`` are one language everywhere, and a tag that
is not BCP-47 (``"xx-INVALID"``, ``""``, ``5``) is refused before any weight changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

V = TypeVar("V")

# English names of common languages, for translation demonstrations ("German: ...") and reports.
LANGUAGE_NAMES: dict[str, str] = {
    "af": "Afrikaans",
    "am": "Amharic",
    "ar": "Arabic",
    "as": "Assamese",
    "az": "Azerbaijani",
    "be": "Belarusian",
    "bg": "Bulgarian",
    "bn": "Bengali",
    "bs": "Bosnian",
    "ca": "Catalan",
    "cs": "Czech",
    "cy": "Welsh",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "eo": "Esperanto",
    "es": "Spanish",
    "et": "Estonian",
    "eu": "Basque",
    "fa": "Persian",
    "fi": "Finnish",
    "fil": "Filipino",
    "fr": "French",
    "ga": "Irish",
    "gl": "Galician",
    "gu": "Gujarati",
    "ha": "Hausa",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "ht": "Haitian Creole",
    "hu": "Hungarian",
    "hy": "Armenian",
    "id": "Indonesian",
    "ig": "Igbo",
    "is": "Icelandic",
    "it": "Italian",
    "ja": "Japanese",
    "jv": "Javanese",
    "ka": "Georgian",
    "kk": "Kazakh",
    "km": "Khmer",
    "kn": "Kannada",
    "ko": "Korean",
    "ky": "Kyrgyz",
    "lo": "Lao",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "mk": "Macedonian",
    "ml": "Malayalam",
    "mn": "Mongolian",
    "mr": "Marathi",
    "ms": "Malay",
    "mt": "Maltese",
    "my": "Burmese",
    "nb": "Norwegian Bokmål",
    "ne": "Nepali",
    "nl": "Dutch",
    "nn": "Norwegian Nynorsk",
    "no": "Norwegian",
    "ny": "Chichewa",
    "pa": "Punjabi",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "rw": "Kinyarwanda",
    "si": "Sinhala",
    "sk": "Slovak",
    "sl": "Slovenian",
    "so": "Somali",
    "sq": "Albanian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "te": "Telugu",
    "tg": "Tajik",
    "th": "Thai",
    "tl": "Tagalog",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "uz": "Uzbek",
    "vi": "Vietnamese",
    "xh": "Xhosa",
    "yo": "Yoruba",
    "yue": "Cantonese",
    "zh": "Chinese",
    "zh-Hans": "Simplified Chinese",
    "zh-Hant": "Traditional Chinese",
    "zu": "Zulu",
}

# ISO 639-1 -> ISO 639-3 + ISO 15924 script, the "xxx_Scrp" names of FLORES+ and FineWeb-2 configurations.
# Arabic, Persian, Swahili, Malay, Estonian, Latvian, Nepali, Norwegian and Chinese are macro-languages; the
# corpora use the individual language (Standard Arabic "arb", Iranian Persian "pes", ...).
ISO639_3_SCRIPT: dict[str, str] = {
    "af": "afr_Latn",
    "am": "amh_Ethi",
    "ar": "arb_Arab",
    "as": "asm_Beng",
    "az": "azj_Latn",
    "be": "bel_Cyrl",
    "bg": "bul_Cyrl",
    "bn": "ben_Beng",
    "bs": "bos_Latn",
    "ca": "cat_Latn",
    "cs": "ces_Latn",
    "cy": "cym_Latn",
    "da": "dan_Latn",
    "de": "deu_Latn",
    "el": "ell_Grek",
    "en": "eng_Latn",
    "eo": "epo_Latn",
    "es": "spa_Latn",
    "et": "ekk_Latn",
    "eu": "eus_Latn",
    "fa": "pes_Arab",
    "fi": "fin_Latn",
    "fr": "fra_Latn",
    "ga": "gle_Latn",
    "gl": "glg_Latn",
    "gu": "guj_Gujr",
    "ha": "hau_Latn",
    "he": "heb_Hebr",
    "hi": "hin_Deva",
    "hr": "hrv_Latn",
    "ht": "hat_Latn",
    "hu": "hun_Latn",
    "hy": "hye_Armn",
    "id": "ind_Latn",
    "ig": "ibo_Latn",
    "is": "isl_Latn",
    "it": "ita_Latn",
    "ja": "jpn_Jpan",
    "jv": "jav_Latn",
    "ka": "kat_Geor",
    "kk": "kaz_Cyrl",
    "km": "khm_Khmr",
    "kn": "kan_Knda",
    "ko": "kor_Hang",
    "ky": "kir_Cyrl",
    "lo": "lao_Laoo",
    "lt": "lit_Latn",
    "lv": "lvs_Latn",
    "mk": "mkd_Cyrl",
    "ml": "mal_Mlym",
    "mr": "mar_Deva",
    "ms": "zsm_Latn",
    "mt": "mlt_Latn",
    "my": "mya_Mymr",
    "nb": "nob_Latn",
    "ne": "npi_Deva",
    "nl": "nld_Latn",
    "nn": "nno_Latn",
    "pa": "pan_Guru",
    "pl": "pol_Latn",
    "pt": "por_Latn",
    "ro": "ron_Latn",
    "ru": "rus_Cyrl",
    "si": "sin_Sinh",
    "sk": "slk_Latn",
    "sl": "slv_Latn",
    "so": "som_Latn",
    "sr": "srp_Cyrl",
    "sv": "swe_Latn",
    "sw": "swh_Latn",
    "ta": "tam_Taml",
    "te": "tel_Telu",
    "tg": "tgk_Cyrl",
    "th": "tha_Thai",
    "tl": "tgl_Latn",
    "tr": "tur_Latn",
    "uk": "ukr_Cyrl",
    "ur": "urd_Arab",
    "uz": "uzn_Latn",
    "vi": "vie_Latn",
    "xh": "xho_Latn",
    "yo": "yor_Latn",
    "zh": "cmn_Hans",
    "zh-Hans": "cmn_Hans",
    "zh-Hant": "cmn_Hant",
    "zu": "zul_Latn",
}

# ``xxx_Scrp`` config names of the corpora themselves (FLORES+ config, FineWeb-2 subset).
_CORPUS_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")


def normalize_language_tag(tag: object) -> str:
    """Validate a BCP-47 language tag and return its canonical form (``"ZH_hans"`` -> ``"zh-Hans"``).

    ``langcodes`` does the work (parsing, registered subtags, canonical case, deprecated and 3-letter codes
    mapped to their 2-letter form: ``"eng"`` -> ``"en"``, ``"iw"`` -> ``"he"``); ``_`` may separate subtags.
    Private-use and undetermined tags (``"x-foo"``, ``"und"``) are refused too: they name no language.

    Raises:
        TypeError: ``tag`` is not a string.
        ValueError: ``tag`` is not a valid tag (the message names it).
    """
    if not isinstance(tag, str):
        raise TypeError(f"a language tag must be a string such as 'de' or 'pt-BR', got {type(tag).__name__}")
    return _normalize(tag.strip())


def normalize_language_keys(mapping: Mapping[Any, V], what: str) -> dict[str, V]:
    """``mapping`` with its keys as canonical tags (:func:`normalize_language_tag`), order kept: the one
    rule for every ``{language: ...}`` argument (texts, token ids, weights, sources). Two keys naming one
    language (``"en"`` and ``"EN"`` or ``"eng"``) are refused rather than merged.

    Raises:
        TypeError, ValueError: a key is not a language tag (as :func:`normalize_language_tag`).
        ValueError: two keys name the same language (the message names both spellings).
    """
    result: dict[str, V] = {}
    spelled: dict[str, Any] = {}
    for key, value in mapping.items():
        tag = normalize_language_tag(key)
        if tag in result:
            raise ValueError(
                f"{what}: language {tag!r} is given twice (as {spelled[tag]!r} and {key!r}): "
                "merge them into one entry"
            )
        result[tag], spelled[tag] = value, key
    return result


_PRIVATE_USE = re.compile(r"^(x-|q[a-t][a-z]$)")


@cache
def _normalize(tag: str) -> str:
    import langcodes

    problem = f"{tag!r} is not a language tag"
    try:
        valid = bool(tag) and langcodes.tag_is_valid(tag)
        canonical = langcodes.standardize_tag(tag) if valid else ""
        language = langcodes.Language.get(canonical).language if valid else None
    except (ValueError, langcodes.LanguageTagError):
        valid, language = False, None
    # "und" (undetermined), "x-..." and qaa-qtz (private use) are valid BCP-47 but name no language.
    if not valid or not language or language == "und" or _PRIVATE_USE.match(language):
        raise ValueError(
            f"{problem}: use a BCP-47 tag, an ISO 639 language code optionally with a script or region "
            "('en', 'de', 'sw', 'zh-Hans', 'pt-BR')"
        )
    return canonical


@dataclass(frozen=True)
class Language:
    """A validated language: ``tag`` (canonical), ``code`` (ISO 639 primary subtag, for the Hub's
    ``language:`` metadata) and its English ``name``."""

    tag: str
    code: str
    name: str


def resolve_language(tag: str) -> Language:
    """Validate ``tag`` and return its canonical form, ISO 639 code and English name."""
    canonical = normalize_language_tag(tag)
    return Language(tag=canonical, code=canonical.split("-")[0], name=language_name(canonical))


def resolve_languages(tags: list[str]) -> list[Language]:
    """Validate every tag (all errors reported together); canonical tags, repeats dropped, order kept."""
    resolved: dict[str, Language] = {}
    errors = []
    for tag in tags:
        try:
            language = resolve_language(tag)
        except (ValueError, TypeError) as err:
            errors.append(str(err))
            continue
        resolved.setdefault(language.tag, language)
    if errors:
        raise ValueError("; ".join(errors))
    return list(resolved.values())


def language_name(tag: str, names: dict[str, str] | None = None) -> str:
    """English display name of a language tag (``"de"`` -> ``"German"``, ``"pt-BR"`` -> ``"Portuguese"``).

    ``names`` (optional) overrides or extends the built-in table; a valid tag outside both gets the name
    ``langcodes`` knows (``"swh"`` -> ``"Swahili"``).
    """
    canonical = normalize_language_tag(tag)
    table = {**LANGUAGE_NAMES, **{normalize_language_tag(k): v for k, v in (names or {}).items()}}
    for candidate in (canonical, "-".join(canonical.split("-")[:2]), canonical.split("-")[0]):
        if candidate in table:
            return table[candidate]
    import langcodes

    name = langcodes.Language.get(canonical).language_name("en")
    # "Swahili (individual language)": the tag already tells it from the macrolanguage.
    return re.sub(r" \((macrolanguage|individual language)\)$", "", name)


def corpus_language_code(tag: str, overrides: dict[str, str] | None = None) -> str:
    """The ``xxx_Scrp`` code (ISO 639-3 + ISO 15924) of a tag, as FLORES+ and FineWeb-2 name their subsets.

    A tag already of that form (``"deu_Latn"``) is returned unchanged; ``overrides`` maps tags to codes for
    corpora that spell a language differently.
    """
    if isinstance(tag, str) and _CORPUS_CODE.match(tag):
        return tag
    canonical = normalize_language_tag(tag)
    if overrides and canonical in overrides:
        return overrides[canonical]
    for candidate in (canonical, "-".join(canonical.split("-")[:2]), canonical.split("-")[0]):
        if candidate in ISO639_3_SCRIPT:
            return ISO639_3_SCRIPT[candidate]
    raise ValueError(
        f"no ISO 639-3 + script code known for {tag!r}: pass the corpus's own code (e.g. 'deu_Latn') instead"
    )
