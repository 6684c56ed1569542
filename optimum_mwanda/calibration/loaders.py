"""Calibration text loaders, by language: local files, ``datasets`` objects and Hub corpora (streamed).

Every loader returns ``{language: [text, ...]}`` ready for :func:`build_calibration`, reads lazily and stops
as soon as each language reaches its caps: ``max_texts`` (texts per language) and ``max_chars``
(characters per language; the text that crosses the limit is cut so a language never exceeds it).

Hub loaders call ``datasets.load_dataset(repo, name=config, split=split, streaming=True)``. The function is
injectable: pass ``load_dataset=``, e.g. to run them offline against local data
with the same schema.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .languages import corpus_language_code, normalize_language_tag

LANGUAGE_FIELDS = ("lang", "language")
_LOCAL_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


# ---------------------------------------------------------------------------------------------------------
# caps
# ---------------------------------------------------------------------------------------------------------
def _check_caps(max_texts: int | None, max_chars: int | None) -> None:
    for name, value in (("max_texts", max_texts), ("max_chars", max_chars)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


class _Collector:
    """Collects texts per language under ``max_texts`` / ``max_chars`` caps."""

    def __init__(self, max_texts: int | None, max_chars: int | None, languages: Sequence[str] | None) -> None:
        _check_caps(max_texts, max_chars)
        self.max_texts = max_texts
        self.max_chars = max_chars
        self.wanted = None if languages is None else [normalize_language_tag(lang) for lang in languages]
        self.texts: dict[str, list[str]] = {lang: [] for lang in self.wanted or []}
        self.chars: dict[str, int] = {lang: 0 for lang in self.wanted or []}

    def is_full(self, lang: str) -> bool:
        texts = self.texts.get(lang, [])
        return (self.max_texts is not None and len(texts) >= self.max_texts) or (
            self.max_chars is not None and self.chars.get(lang, 0) >= self.max_chars
        )

    def done(self) -> bool:
        """Every wanted language is full (never true without an explicit language list)."""
        return self.wanted is not None and all(self.is_full(lang) for lang in self.wanted)

    def add(self, lang: str, text: object) -> None:
        if not isinstance(text, str):
            return
        text = text.strip()
        if not text or (self.wanted is not None and lang not in self.wanted) or self.is_full(lang):
            return
        if self.max_chars is not None:
            text = text[: self.max_chars - self.chars.get(lang, 0)]
        self.texts.setdefault(lang, []).append(text)
        self.chars[lang] = self.chars.get(lang, 0) + len(text)

    def result(self, source: str) -> dict[str, list[str]]:
        empty = [lang for lang, texts in self.texts.items() if not texts]
        if empty:
            raise ValueError(f"{source} has no text for language(s) {empty}")
        if not self.texts:
            raise ValueError(f"{source} has no text")
        return self.texts


# ---------------------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------------------
def _local_files(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not items:
        raise ValueError("no paths given")
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_LOCAL_SUFFIXES))
            if not found:
                raise ValueError(f"folder {path} has no {', '.join(_LOCAL_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if not path.name.endswith(_LOCAL_SUFFIXES):
                raise ValueError(f"{path}: unsupported file type; use one of {', '.join(_LOCAL_SUFFIXES)}")
            files.append(path)
        else:
            raise FileNotFoundError(f"calibration path {path} does not exist")
    return files


def _language_from_name(path: Path) -> str | None:
    """``de.txt`` / ``sw.jsonl.gz`` / ``pt-BR.parquet`` -> the tag; ``None`` when the name is not a tag."""
    try:
        return normalize_language_tag(path.name.split(".")[0])
    except ValueError:
        return None


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the caller's with-block


def _txt_units(handle: Iterable[str], unit: str) -> Iterator[str]:
    if unit == "line":
        yield from handle
        return
    block: list[str] = []
    for line in handle:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _record_language(
    record: Mapping[str, Any], language_field: str | None, fallback: str | None, where: str
) -> str:
    fields = (language_field,) if language_field else LANGUAGE_FIELDS
    for name in fields:
        value = record.get(name)
        if value:
            return normalize_language_tag(value)
    if fallback is None:
        raise ValueError(
            f"{where}: no language: name the file after it ('de.jsonl'), add a "
            f"{' or '.join(repr(f) for f in fields)} field, or pass language="
        )
    return fallback


def load_local_texts(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    language: str | None = None,
    languages: Sequence[str] | None = None,
    text_field: str = "text",
    language_field: str | None = None,
    unit: str = "line",
    max_texts: int | None = None,
    max_chars: int | None = None,
) -> dict[str, list[str]]:
    """Read calibration texts from local files or folders (searched recursively, in sorted order).

    Formats: ``.txt`` / ``.txt.gz`` (one text per line, or per blank-line-separated paragraph with
    ``unit="paragraph"``), ``.jsonl`` / ``.jsonl.gz`` (a ``text_field`` per record) and ``.parquet`` (a
    ``text_field`` column). The language of a text is ``language`` when given (one fixed language), else the
    record's ``language_field`` (default: a ``lang`` or ``language`` field/column), else the file name
    (``de.txt``, ``sw.jsonl``).

    Args:
        languages: keep only these languages (reading stops once all are full).
        max_texts, max_chars: caps per language.
    """
    if unit not in ("line", "paragraph"):
        raise ValueError(f"unit must be 'line' or 'paragraph', got {unit!r}")
    fixed = normalize_language_tag(language) if language is not None else None
    collector = _Collector(max_texts, max_chars, languages)
    files = _local_files(paths)
    for path in files:
        if collector.done():
            break
        from_name = fixed or _language_from_name(path)
        if path.name.endswith((".txt", ".txt.gz")):
            if from_name is None:
                raise ValueError(
                    f"{path}: cannot tell the language: name the file '<lang>.txt' or pass language="
                )
            if collector.wanted is not None and from_name not in collector.wanted:
                continue  # a language that was not asked for: skip the file unread
            with _open_text(path) as handle:
                for text in _txt_units(handle, unit):
                    if collector.is_full(from_name):
                        break
                    collector.add(from_name, text)
        elif path.name.endswith((".jsonl", ".jsonl.gz")):
            with _open_text(path) as handle:
                for number, line in enumerate(handle, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
                    if not isinstance(record, dict) or text_field not in record:
                        raise ValueError(f"{path}:{number}: a record without a {text_field!r} field")
                    lang = fixed or _record_language(record, language_field, from_name, f"{path}:{number}")
                    collector.add(lang, record[text_field])
                    if collector.done():
                        break
        else:
            _read_parquet(path, collector, text_field, language_field, fixed, from_name)
    shown = ", ".join(str(p) for p in files[:3]) + (", ..." if len(files) > 3 else "")
    return collector.result(f"the calibration files ({shown})")


def _read_parquet(
    path: Path,
    collector: _Collector,
    text_field: str,
    language_field: str | None,
    fixed: str | None,
    from_name: str | None,
) -> None:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no {text_field!r} column (columns: {names})")
    lang_column = None
    if fixed is None:
        candidates = (language_field,) if language_field else LANGUAGE_FIELDS
        lang_column = next((c for c in candidates if c in names), None)
        if lang_column is None and from_name is None:
            raise ValueError(
                f"{path}: no language column {list(candidates)} and the file name is not a language tag"
            )
    columns = [text_field] + ([lang_column] if lang_column else [])
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        texts = batch.column(text_field).to_pylist()
        langs = batch.column(lang_column).to_pylist() if lang_column else [None] * len(texts)
        for number, (text, lang) in enumerate(zip(texts, langs)):
            tag = fixed or (normalize_language_tag(lang) if lang else from_name)
            if tag is None:
                raise ValueError(f"{path}: row {number} of a batch has an empty {lang_column!r} value")
            collector.add(tag, text)
        if collector.done():
            return


# ---------------------------------------------------------------------------------------------------------
# datasets objects
# ---------------------------------------------------------------------------------------------------------
def load_dataset_texts(
    dataset: Iterable[Mapping[str, Any]],
    *,
    text_column: str = "text",
    language_column: str | None = None,
    language: str | None = None,
    languages: Sequence[str] | None = None,
    max_texts: int | None = None,
    max_chars: int | None = None,
) -> dict[str, list[str]]:
    """Texts by language from a ``datasets.Dataset`` / ``IterableDataset`` (or any iterable of dict rows).

    The language of a row is ``language`` when given (one fixed language), else its ``language_column``
    (default: a ``lang`` or ``language`` column). Iteration stops once every wanted language is full.
    """
    if type(dataset).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise TypeError(f"got a {type(dataset).__name__}: pick a split first, e.g. dataset['train']")
    fixed = normalize_language_tag(language) if language is not None else None
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_column not in columns:
        raise ValueError(f"the dataset has no {text_column!r} column (columns: {columns})")
    lang_column = language_column
    if fixed is None and lang_column is None and columns is not None:
        lang_column = next((c for c in LANGUAGE_FIELDS if c in columns), None)
        if lang_column is None:
            raise ValueError(
                f"the dataset has no 'lang'/'language' column (columns: {columns}): pass language_column= "
                "or language="
            )
    if columns is not None and lang_column is not None and lang_column not in columns:
        raise ValueError(f"the dataset has no {lang_column!r} column (columns: {columns})")
    if columns is not None and hasattr(dataset, "select_columns"):
        # Only the needed columns are decoded while iterating.
        dataset = dataset.select_columns(
            [text_column] + ([lang_column] if fixed is None and lang_column else [])
        )
    return _collect_rows(
        dataset, text_column, lang_column, fixed, languages, max_texts, max_chars, "the dataset"
    )


def _collect_rows(
    rows: Iterable[Mapping[str, Any]],
    text_column: str,
    lang_column: str | None,
    fixed: str | None,
    languages: Sequence[str] | None,
    max_texts: int | None,
    max_chars: int | None,
    source: str,
) -> dict[str, list[str]]:
    collector = _Collector(max_texts, max_chars, [fixed] if fixed and languages is None else languages)
    for row in rows:
        if text_column not in row:
            raise ValueError(f"{source}: a row has no {text_column!r} field (fields: {sorted(row)})")
        lang = fixed or _record_language(row, lang_column, None, f"{source}: a row")
        collector.add(lang, row[text_column])
        if collector.done():
            break
    return collector.result(source)


# ---------------------------------------------------------------------------------------------------------
# Hub corpora
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubCorpus:
    """A Hub text corpus with one configuration per language."""

    key: str
    repo_id: str
    default_split: str
    splits: tuple[str, ...]
    text_field: str
    config: Callable[[str], str]
    description: str


def _fineweb2_config(lang: str) -> str:
    if normalize_language_tag(lang).split("-")[0] == "en":
        raise ValueError(
            "FineWeb-2 has no English subset (English is HuggingFaceFW/fineweb): use another source"
        )
    # FineWeb-2 labels Chinese as Han ("cmn_Hani") and Persian as the macro-language ("fas_Arab").
    return corpus_language_code(lang, {"zh": "cmn_Hani", "zh-Hans": "cmn_Hani", "fa": "fas_Arab"})


HUB_CORPORA: dict[str, HubCorpus] = {
    "culturax": HubCorpus(
        "culturax",
        "uonlp/CulturaX",
        "train",
        ("train",),
        "text",
        lambda lang: normalize_language_tag(lang).split("-")[0],
        "CulturaX (cleaned mC4 + OSCAR; gated: accept its terms and pass token=)",
    ),
    "fineweb-2": HubCorpus(
        "fineweb-2",
        "HuggingFaceFW/fineweb-2",
        "train",
        ("train", "test"),
        "text",
        _fineweb2_config,
        "FineWeb-2 (Common Crawl, 1000+ languages; configs 'deu_Latn', ...)",
    ),
    "mc4": HubCorpus(
        "mc4",
        "allenai/c4",
        "train",
        ("train", "validation"),
        "text",
        normalize_language_tag,
        "mC4 (multilingual C4, allenai/c4 language configs)",
    ),
    "wikipedia": HubCorpus(
        "wikipedia",
        "wikimedia/wikipedia",
        "train",
        ("train",),
        "text",
        lambda lang: normalize_language_tag(lang).split("-")[0],  # the dump date is prefixed by the loader
        "Wikipedia (wikimedia/wikipedia dumps, configs '20231101.de', ...)",
    ),
    "flores": HubCorpus(
        "flores",
        "openlanguagedata/flores_plus",
        "dev",
        ("dev", "devtest"),
        "text",
        corpus_language_code,
        "FLORES+ (parallel sentences; gated: accept its terms and pass token=)",
    ),
}


def _resolve_load_dataset(load_dataset: Callable[..., Any] | None) -> Callable[..., Any]:
    if load_dataset is not None:
        return load_dataset
    import datasets

    return datasets.load_dataset


def load_hub_texts(
    corpus: str,
    languages: str | Sequence[str],
    *,
    split: str | None = None,
    max_texts: int | None = None,
    max_chars: int | None = 1_000_000,
    configs: Mapping[str, str] | None = None,
    wikipedia_date: str = "20231101",
    load_dataset: Callable[..., Any] | None = None,
    **load_kwargs: Any,
) -> dict[str, list[str]]:
    """Stream texts of ``languages`` from a Hub corpus: one of :data:`HUB_CORPORA` (``"culturax"``,
    ``"fineweb-2"``, ``"mc4"``, ``"wikipedia"``, ``"flores"``).

    Args:
        languages: language tags (``"de"``, ``"sw"``); each is mapped to the corpus's configuration name
            (``"deu_Latn"`` for FineWeb-2, ``"20231101.de"`` for Wikipedia); ``configs`` overrides the mapping.
        split: the split to read (default: the corpus's training split, ``"dev"`` for FLORES+).
        max_texts, max_chars: caps per language (streaming stops there; default one million characters).
        load_dataset: replaces ``datasets.load_dataset`` (see module doc).
        load_kwargs: passed on to ``load_dataset`` (``token=``, ``revision=``, ...).

    Returns:
        ``{language: [text, ...]}``; for FLORES+ the lists are aligned (sorted by sentence ``id``).
    """
    if corpus not in HUB_CORPORA:
        raise ValueError(f"unknown Hub corpus {corpus!r}; choose one of {sorted(HUB_CORPORA)}")
    spec = HUB_CORPORA[corpus]
    _check_caps(max_texts, max_chars)
    split = split or spec.default_split
    if split not in spec.splits:
        raise ValueError(f"{spec.repo_id} has splits {list(spec.splits)}, not {split!r}")
    tags = [languages] if isinstance(languages, str) else list(languages)
    if not tags:
        raise ValueError("languages is empty: name at least one language")
    names = {normalize_language_tag(k): v for k, v in (configs or {}).items()}
    plan = {}
    for tag in tags:
        lang = normalize_language_tag(tag)
        config = names.get(lang) or spec.config(lang)
        plan[lang] = f"{wikipedia_date}.{config}" if corpus == "wikipedia" and lang not in names else config
    load = _resolve_load_dataset(load_dataset)
    if corpus == "flores":
        return _load_parallel(spec, plan, split, max_texts, load, load_kwargs)
    result: dict[str, list[str]] = {}
    for lang, config in plan.items():
        stream = load(spec.repo_id, name=config, split=split, streaming=True, **load_kwargs)
        source = f"{spec.repo_id} (config {config!r}, split {split!r})"
        texts = _collect_rows(stream, spec.text_field, None, lang, None, max_texts, max_chars, source)
        result[lang] = texts[lang]
    return result


def _load_parallel(
    spec: HubCorpus,
    plan: Mapping[str, str],
    split: str,
    max_texts: int | None,
    load: Callable[..., Any],
    load_kwargs: Mapping[str, Any],
) -> dict[str, list[str]]:
    """FLORES+: whole split per language, ordered by sentence id, so index ``i`` is one sentence everywhere."""
    by_language: dict[str, dict[Any, str]] = {}
    for lang, config in plan.items():
        rows = load(spec.repo_id, name=config, split=split, streaming=True, **dict(load_kwargs))
        sentences: dict[Any, str] = {}
        for position, row in enumerate(rows):
            if spec.text_field not in row:
                raise ValueError(f"{spec.repo_id}/{config}: a row without a {spec.text_field!r} field")
            sentences[row.get("id", position)] = row[spec.text_field]
        if not sentences:
            raise ValueError(f"{spec.repo_id}/{config} ({split}) has no sentences")
        by_language[lang] = sentences
    ids = sorted(set.intersection(*(set(s) for s in by_language.values())))
    if not ids:
        raise ValueError(f"{spec.repo_id}: the languages {list(plan)} share no sentence ids")
    if max_texts is not None:
        ids = ids[:max_texts]
    return {lang: [sentences[i] for i in ids] for lang, sentences in by_language.items()}


def load_culturax(languages: str | Sequence[str], **kwargs: Any) -> dict[str, list[str]]:
    """CulturaX (``uonlp/CulturaX``, config = ISO 639-1 code, field ``text``); see :func:`load_hub_texts`."""
    return load_hub_texts("culturax", languages, **kwargs)


def load_fineweb2(languages: str | Sequence[str], **kwargs: Any) -> dict[str, list[str]]:
    """FineWeb-2 (``HuggingFaceFW/fineweb-2``, config ``deu_Latn``...); see :func:`load_hub_texts`."""
    return load_hub_texts("fineweb-2", languages, **kwargs)


def load_mc4(languages: str | Sequence[str], **kwargs: Any) -> dict[str, list[str]]:
    """mC4 (``allenai/c4``, config = language code, field ``text``); see :func:`load_hub_texts`."""
    return load_hub_texts("mc4", languages, **kwargs)


def load_wikipedia(
    languages: str | Sequence[str], date: str = "20231101", **kwargs: Any
) -> dict[str, list[str]]:
    """Wikipedia (``wikimedia/wikipedia``, config ``f"{date}.{lang}"``); see :func:`load_hub_texts`."""
    return load_hub_texts("wikipedia", languages, wikipedia_date=date, **kwargs)


def load_flores(languages: str | Sequence[str], split: str = "dev", **kwargs: Any) -> dict[str, list[str]]:
    """FLORES+ (``openlanguagedata/flores_plus``, config ``deu_Latn``..., split ``dev``/``devtest``).

    Returns aligned sentence lists (index ``i`` is the same sentence in every language), the input of
    :func:`~optimum_mwanda.calibration.translation.translation_demonstrations`.
    """
    return load_hub_texts("flores", languages, split=split, **kwargs)
