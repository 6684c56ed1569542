#!/usr/bin/env python
"""Build the offline multilingual lm-evaluation-harness tasks in ``optimum_mwanda/evaluation/tasks/``.

Two task families, one subtask per language, both made only of text that no calibration sentence shares:

* ``mwanda_continuation_<lang>`` (multiple choice, XStoryCloze/HellaSwag style, every bundled language):
  a context of 1-3 consecutive sentences of a paragraph from the **held-out** part of the bundled corpus
  (``optimum_mwanda/calibration/data/heldout``), the true next sentence and 3 distractors: sentences of
  other held-out paragraphs of the same language and the same document (the handbook edition, or the Kolibri
  catalogue for Swahili), chosen among those of the most similar length so that length gives no hint.
  Scored by lm-eval's log-likelihood ``acc`` and ``acc_norm``.
* ``mwanda_translation_en-<lang>`` / ``mwanda_translation_<lang>-en`` (3-shot generation, scored by chrF
  through sacrebleu, lm-eval's ``chrf``): sentence pairs of *The Debian Administrator's Handbook*, aligned
  by document structure. The bundled corpus keeps no structure (a sub-sample of paragraphs), so the pairs
  are rebuilt from the Debian package ``debian-handbook`` as ``scripts/build_corpus.py`` does: every
  language edition has the same HTML pages with the same paragraphs in the same order, so paragraph ``i``
  of page ``p`` is paired with paragraph ``i`` of page ``p`` in English (only on pages with the same number of
  paragraphs in both), and the paragraphs are split into sentences (pysbd) and paired by position when both
  sides have the same number of sentences. Swahili has no parallel text in the bundled sources (its text is
  Kolibri's interface strings), so it has no translation subtask.

No task sentence (context, ending, distractor, source or reference) occurs in the calibration text of its
language: every candidate is checked (a substring search in that language's calibration file) and dropped
when it does; the builder fails if the written files contain one, and ``tests/test_downstream.py`` checks the
shipped files again.

Output: ``tasks/data/{continuation,translation}/<lang>.jsonl`` (a few hundred KB in all), the task YAMLs and
``tasks/manifest.json`` (sizes per language, sources, licences). Requires ``pip install pysbd`` and, for the
translation pairs, the handbook ``.deb`` (``--deb`` or ``apt-get download debian-handbook``)::

    python scripts/build_tasks.py --deb debian-handbook_11.20220922_all.deb
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import build_corpus as corpus  # the corpus builder's handbook reader and language filters, reused as is

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = REPO_ROOT / "optimum_mwanda" / "calibration" / "data"
DEFAULT_OUT = REPO_ROOT / "optimum_mwanda" / "evaluation" / "tasks"

SEED = 20261201
CONTINUATION_ITEMS = 30  # per language (fewer where the held-out text has fewer usable paragraphs)
CONTINUATION_CONTEXT_SENTENCES = 3
DISTRACTOR_POOL = 12  # the 3 distractors are drawn from the 12 held-out sentences closest in length
TRANSLATION_TEST = 25  # sentence pairs per language
TRANSLATION_FEWSHOT = 3  # demonstrations (a separate split, never scored)
MAX_ENGLISH_CHARS = 150
MAX_GEN_TOKS = 64  # the longest reference is 150 English characters (~40 tokens; CJK ~50)
CJK = {"zh", "ja", "ko"}

# pysbd has rules for these languages; the other Latin-script languages use its English rules (sentence ends
# are ". ", "! ", "? " there too).
PYSBD_LANGUAGES = {"ar", "da", "de", "el", "en", "es", "fa", "fr", "it", "ja", "nl", "pl", "ru", "zh"}


def language_name(code: str) -> str:
    """English name of an ISO 639-1 code, for prompts ("German", "Norwegian Bokmål", "Swahili")."""
    import pycountry

    name = pycountry.languages.get(alpha_2=code).name
    return name.split(" (")[0]  # "Swahili (macrolanguage)" -> "Swahili"


class SentenceSplitter:
    """pysbd segmenters per language (a rule-based splitter; here because no bundled text is pre-split)."""

    def __init__(self) -> None:
        import pysbd

        self._pysbd = pysbd
        self._cache: dict[str, object] = {}

    def __call__(self, text: str, lang: str) -> list[str]:
        rules = lang if lang in PYSBD_LANGUAGES else "en"
        if rules not in self._cache:
            self._cache[rules] = self._pysbd.Segmenter(language=rules, clean=False)
        sentences = self._cache[rules].segment(text)  # type: ignore[attr-defined]
        return [s.strip() for s in sentences if s.strip()]


def _ok_sentence(sentence: str, lang: str) -> bool:
    low, high = (8, 150) if lang in CJK else (25, 260)
    letters = sum(ch.isalpha() for ch in sentence)
    non_space = sum(not ch.isspace() for ch in sentence)
    return low <= len(sentence) <= high and non_space > 0 and letters / non_space >= 0.6


def _calibration_text(lang: str) -> str:
    return (CORPUS_DIR / "calibration" / f"{lang}.txt").read_text(encoding="utf-8")


def _check_no_calibration(items: Sequence[dict], fields: dict[str, str], task: str) -> None:
    """Fail when a field of an item (a sentence or a list of sentences) occurs in calibration text."""
    for item in items:
        for field, lang in fields.items():
            calibration = _calibration_text(lang)
            values = item[field] if isinstance(item[field], list) else [item[field]]
            for value in values:
                for sentence in value if isinstance(value, list) else [value]:
                    if sentence in calibration:
                        raise RuntimeError(f"{task}: {sentence!r} is calibration text of {lang!r}")


# ---------------------------------------------------------------------------------------------------------
# multiple-choice continuation, from the held-out corpus
# ---------------------------------------------------------------------------------------------------------
def continuation_items(lang: str, split: SentenceSplitter) -> list[dict]:
    calibration = _calibration_text(lang)
    paragraphs = (CORPUS_DIR / "heldout" / f"{lang}.txt").read_text(encoding="utf-8").splitlines()
    sentences_of = []
    for paragraph in paragraphs:
        sentences = [s for s in split(paragraph, lang) if s not in calibration]
        sentences_of.append(sentences)
    rng = random.Random(f"{SEED}:continuation:{lang}")
    candidates = []
    for index, sentences in enumerate(sentences_of):
        usable = [k for k in range(1, len(sentences)) if _ok_sentence(sentences[k], lang)]
        if usable:
            candidates.append((index, rng.choice(usable)))
    rng.shuffle(candidates)
    items = []
    for index, k in candidates:
        ending = sentences_of[index][k]
        pool = {
            s
            for j, others in enumerate(sentences_of)
            if j != index
            for s in others
            if _ok_sentence(s, lang) and s != ending
        }
        if len(pool) < 3:
            continue
        nearest = sorted(pool, key=lambda s: (abs(len(s) - len(ending)), s))[:DISTRACTOR_POOL]
        distractors = rng.sample(nearest, 3)
        choices = [ending, *distractors]
        rng.shuffle(choices)
        context = sentences_of[index][max(0, k - CONTINUATION_CONTEXT_SENTENCES) : k]
        items.append(
            {
                "id": f"{lang}-{index}-{k}",
                "context": context,
                "choices": choices,
                "label": choices.index(ending),
            }
        )
        if len(items) == CONTINUATION_ITEMS:
            break
    items.sort(key=lambda item: item["id"])
    _check_no_calibration(items, {"context": lang, "choices": lang}, f"continuation {lang}")
    return items


# ---------------------------------------------------------------------------------------------------------
# translation pairs, from the handbook's page/paragraph structure
# ---------------------------------------------------------------------------------------------------------
def page_paragraphs(edition: Path) -> dict[str, list[str]]:
    """Paragraphs of every page of one edition, pages in reading order (the "next" links)."""
    pages: dict[str, list[str]] = {}
    page: str | None = "index.html"
    while page and page not in pages:
        parser = corpus._ParagraphParser()
        parser.feed((edition / page).read_text(encoding="utf-8"))
        parser.close()
        pages[page] = parser.paragraphs
        page = parser.next_page.split("#")[0] if parser.next_page else None
    return pages


def aligned_pairs(english: dict[str, list[str]], other: dict[str, list[str]], lang: str, split) -> list:
    """``(en, xx)`` sentence pairs aligned by page, paragraph position and sentence position."""
    english_paragraphs = {p for paragraphs in english.values() for p in paragraphs}
    pairs = []
    for page, en_paragraphs in english.items():
        xx_paragraphs = other.get(page)
        if xx_paragraphs is None or len(xx_paragraphs) != len(en_paragraphs):
            continue  # structure differs on this page: no safe alignment
        for en_par, xx_par in zip(en_paragraphs, xx_paragraphs):
            if not corpus.is_in_language(xx_par, lang, english_paragraphs):
                continue  # untranslated paragraph
            en_sents, xx_sents = split(en_par, "en"), split(xx_par, lang)
            if len(en_sents) != len(xx_sents):
                continue
            for en, xx in zip(en_sents, xx_sents):
                ratio = len(xx) / max(1, len(en))
                low = 0.15 if lang in CJK else 0.5
                if (
                    en != xx
                    and _ok_sentence(en, "en")
                    and len(en) <= MAX_ENGLISH_CHARS
                    and _ok_sentence(xx, lang)
                    and low <= ratio <= 2.2
                    and corpus.is_in_language(xx, lang, set())
                ):
                    pairs.append((en, xx))
    return list(dict.fromkeys(pairs))


def translation_items(lang: str, pairs: list[tuple[str, str]]) -> tuple[list[dict], list[dict]]:
    en_calibration, xx_calibration = _calibration_text("en"), _calibration_text(lang)
    clean = [(en, xx) for en, xx in pairs if en not in en_calibration and xx not in xx_calibration]
    rng = random.Random(f"{SEED}:translation:{lang}")
    chosen = rng.sample(clean, min(len(clean), TRANSLATION_TEST + TRANSLATION_FEWSHOT))
    rows = [{"id": f"{lang}-{i}", "en": en, lang: xx} for i, (en, xx) in enumerate(chosen)]
    fewshot, test = rows[:TRANSLATION_FEWSHOT], rows[TRANSLATION_FEWSHOT:]
    _check_no_calibration(fewshot + test, {"en": "en", lang: lang}, f"translation {lang}")
    return fewshot, test


# ---------------------------------------------------------------------------------------------------------
# YAMLs and files
# ---------------------------------------------------------------------------------------------------------
def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1000)


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8")


# Templates (no .yaml suffix, as in lm-eval's own task folders, so the task index skips them); written as
# text because `!function` is lm-eval's YAML tag. `custom_dataset` reads the files from inside the package.
LOADER = "!function optimum_mwanda.evaluation.tasks.loader.load_local_dataset"
CONTINUATION_TEMPLATE = f"""# Built by scripts/build_tasks.py. 4-way next-sentence choice on held-out text, by log-likelihood.
custom_dataset: {LOADER}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context | join(' ')}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
TRANSLATION_TEMPLATE = f"""# Built by scripts/build_tasks.py. {TRANSLATION_FEWSHOT}-shot sentence translation (greedy), scored by chrF.
custom_dataset: {LOADER}
output_type: generate_until
test_split: test
fewshot_split: fewshot
num_fewshot: {TRANSLATION_FEWSHOT}
fewshot_config:
  sampler: first_n
generation_kwargs:
  until:
    - "\\n"
  do_sample: false
  max_gen_toks: {MAX_GEN_TOKS}
metric_list:
  - metric: chrf
    aggregation: chrf
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_tasks(out: Path, continuation: dict[str, list], translation: dict[str, tuple[list, list]]) -> dict:
    for sub in ("continuation", "translation", "data"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    (out / "continuation").mkdir(parents=True)
    (out / "translation").mkdir(parents=True)
    (out / "continuation" / "_continuation_template").write_text(CONTINUATION_TEMPLATE, encoding="utf-8")
    (out / "translation" / "_translation_template").write_text(TRANSLATION_TEMPLATE, encoding="utf-8")
    for lang, items in continuation.items():
        _write_jsonl(out / "data" / "continuation" / f"{lang}.jsonl", items)
        task = {
            "include": "_continuation_template",
            "task": f"mwanda_continuation_{lang}",
            "task_alias": f"continuation {lang}",
            "dataset_kwargs": {"data_files": {"test": f"continuation/{lang}.jsonl"}},
        }
        if lang in CJK:  # no space between CJK sentences
            task["target_delimiter"] = ""
            task["doc_to_text"] = "{{context | join('')}}"
        (out / "continuation" / f"mwanda_continuation_{lang}.yaml").write_text(_yaml(task), encoding="utf-8")
    for lang, (fewshot, test) in translation.items():
        _write_jsonl(out / "data" / "translation" / f"{lang}.test.jsonl", test)
        _write_jsonl(out / "data" / "translation" / f"{lang}.fewshot.jsonl", fewshot)
        for source, target in (("en", lang), (lang, "en")):
            task = {
                "include": "_translation_template",
                "task": f"mwanda_translation_{source}-{target}",
                "task_alias": f"translation {source}->{target}",
                "dataset_kwargs": {
                    "data_files": {
                        "test": f"translation/{lang}.test.jsonl",
                        "fewshot": f"translation/{lang}.fewshot.jsonl",
                    }
                },
                "doc_to_text": f"{language_name(source)}: {{{{{source}}}}}\n{language_name(target)}:",
                "doc_to_target": f"{{{{{target}}}}}",
            }
            name = f"mwanda_translation_{source}-{target}.yaml"
            (out / "translation" / name).write_text(_yaml(task), encoding="utf-8")
    groups = {
        "mwanda_continuation": [f"mwanda_continuation_{lang}" for lang in continuation],
        "mwanda_translation_en_xx": [f"mwanda_translation_en-{lang}" for lang in translation],
        "mwanda_translation_xx_en": [f"mwanda_translation_{lang}-en" for lang in translation],
    }
    for group, tasks in groups.items():
        metric = "acc" if group == "mwanda_continuation" else "chrf"
        data = {
            "group": group,
            "task": tasks,
            # The unweighted mean over languages (each language counts once, whatever its size).
            "aggregate_metric_list": [{"metric": metric, "aggregation": "mean", "weight_by_size": False}]
            + (
                [{"metric": "acc_norm", "aggregation": "mean", "weight_by_size": False}]
                if metric == "acc"
                else []
            ),
            "metadata": {"version": 1.0},
        }
        (out / f"{group}.yaml").write_text(_yaml(data), encoding="utf-8")
    sizes = {
        lang: {
            "continuation": len(continuation.get(lang, [])),
            "translation_test": len(translation[lang][1]) if lang in translation else 0,
            "translation_fewshot": len(translation[lang][0]) if lang in translation else 0,
        }
        for lang in sorted(set(continuation) | set(translation))
    }
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="a local debian-handbook .deb (default: apt-get download)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)

    corpus_manifest = json.loads((CORPUS_DIR / "manifest.json").read_text(encoding="utf-8"))
    languages = sorted(corpus_manifest["languages"])
    split = SentenceSplitter()
    continuation = {lang: continuation_items(lang, split) for lang in languages}

    handbook_languages = [
        lang for lang in languages if corpus_manifest["languages"][lang]["package"] == "debian-handbook"
    ]
    locale_of = {lang: locale for locale, lang in corpus.HANDBOOK_LOCALES.items()}
    translation: dict[str, tuple[list, list]] = {}
    with tempfile.TemporaryDirectory(prefix="mwanda-tasks-") as tmp:
        deb = args.deb.resolve() if args.deb else None
        html_root, handbook_version, _ = corpus.fetch_handbook(Path(tmp), deb)
        english = page_paragraphs(html_root / "en-US")
        for lang in handbook_languages:
            if lang == "en":
                continue
            pairs = aligned_pairs(english, page_paragraphs(html_root / locale_of[lang]), lang, split)
            translation[lang] = translation_items(lang, pairs)
            print(f"{lang}: {len(pairs)} aligned sentence pairs", flush=True)

    sizes = write_tasks(args.out, continuation, translation)
    manifest = {
        "format_version": 1,
        "built_by": "scripts/build_tasks.py",
        "seed": SEED,
        "sources": {
            "continuation": "held-out part of the bundled corpus (optimum_mwanda/calibration/data/heldout; "
            "see its manifest.json and LICENSES.md)",
            "translation": f"Debian package debian-handbook {handbook_version}, editions aligned by page and "
            "paragraph position, sentences by position",
        },
        "licenses": {
            "debian-handbook": "GPL-2.0-or-later OR CC-BY-SA-3.0",
            "kolibri (sw)": "MIT",
            "details": "optimum_mwanda/calibration/data/LICENSES.md",
        },
        "sizes": sizes,
    }
    (args.out / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    total = sum(f.stat().st_size for f in (args.out / "data").rglob("*") if f.is_file())
    print("language  continuation  translation (test + few-shot)")
    for lang, size in sizes.items():
        print(
            f"{lang:8s}  {size['continuation']:12d}  {size['translation_test']:3d} + {size['translation_fewshot']}"
        )
    print(f"data files: {total / 1e3:.0f} KB in {args.out / 'data'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
