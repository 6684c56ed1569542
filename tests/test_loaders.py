"""Calibration loaders against local fixtures: files, ``datasets`` objects, Hub schemas via an injected loader."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optimum_mwanda.calibration.loaders import (
    load_culturax,
    load_dataset_texts,
    load_fineweb2,
    load_flores,
    load_hub_texts,
    load_local_texts,
    load_mc4,
    load_wikipedia,
)

FIXTURES = Path(__file__).parent / "fixtures" / "calibration"
PARALLEL = json.loads((FIXTURES / "parallel.json").read_text(encoding="utf-8"))
ZH = ["市场一早就开门。", "孩子们一起走路去上学。", "雨后河面很宽。"]


# ---------------------------------------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """The local fixture folder plus a parquet file (language column) and a gzipped text file."""
    root = tmp_path / "texts"
    shutil.copytree(FIXTURES / "local", root)
    table = pa.table({"text": ["Mto ni mpana.", "Die Schule ist nah.", ""], "language": ["sw", "de", "de"]})
    pq.write_table(table, root / "extra.parquet")
    (root / "nested").mkdir()
    with gzip.open(root / "nested" / "es.txt.gz", "wt", encoding="utf-8") as handle:
        handle.write("Hola.\nBuenos días.\n")
    return root


def test_folder_of_txt_jsonl_parquet_gz(folder):
    texts = load_local_texts(folder)
    assert sorted(texts) == ["de", "en", "es", "fr", "sw", "zh"]
    # Files are read in sorted order: de.txt, extra.parquet, fr.jsonl, mixed.jsonl, nested/es.txt.gz, sw.txt
    assert texts["de"] == PARALLEL["de"] + ["Die Schule ist nah."]
    assert texts["sw"] == ["Mto ni mpana."] + PARALLEL["sw"]
    assert texts["fr"] == PARALLEL["fr"]  # from the file name fr.jsonl
    assert texts["en"] == PARALLEL["en"]  # from the "lang" field of mixed.jsonl
    assert texts["zh"] == ZH  # from the "language" field
    assert texts["es"] == ["Hola.", "Buenos días."]


def test_caps_and_language_filter(folder):
    capped = load_local_texts(folder, max_texts=2)
    assert all(len(v) <= 2 for v in capped.values())
    assert capped["de"] == PARALLEL["de"][:2]
    chars = load_local_texts(folder / "de.txt", max_chars=40)
    assert sum(map(len, chars["de"])) == 40
    assert (
        chars["de"][0] == PARALLEL["de"][0]
        and chars["de"][1] == PARALLEL["de"][1][: 40 - len(PARALLEL["de"][0])]
    )
    only = load_local_texts(folder, languages=["zh", "fr"])
    assert list(only) == ["zh", "fr"] and only["zh"] == ZH
    with pytest.raises(ValueError, match=r"no text for language\(s\) \['ko'\]"):
        load_local_texts(folder, languages=["ko"])


def test_fixed_language_and_paragraph_units(folder):
    fixed = load_local_texts([folder / "mixed.jsonl", folder / "de.txt"], language="en")
    assert list(fixed) == ["en"] and len(fixed["en"]) == 6 + 3 + 6
    paragraphs = load_local_texts(FIXTURES / "paragraphs", unit="paragraph")
    assert paragraphs["es"] == [
        "El mercado abre temprano.\nLa gente llega con sus cestas.",
        "Los niños van juntos a la escuela.",
        "El río es ancho después de las lluvias.\nEl puente está cerrado.",
    ]
    lines = load_local_texts(FIXTURES / "paragraphs")
    assert len(lines["es"]) == 5


def test_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_local_texts(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("some text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot tell the language"):
        load_local_texts(tmp_path / "notes.txt")
    assert load_local_texts(tmp_path / "notes.txt", language="en") == {"en": ["some text"]}
    (tmp_path / "de.jsonl").write_text('{"text": "ok"}\n{broken\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"de\.jsonl:2: not valid JSON"):
        load_local_texts(tmp_path / "de.jsonl")
    (tmp_path / "fr.jsonl").write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="without a 'text' field"):
        load_local_texts(tmp_path / "fr.jsonl")
    (tmp_path / "data.csv").write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_local_texts(tmp_path / "data.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no"):
        load_local_texts(empty)
    with pytest.raises(ValueError, match="max_texts"):
        load_local_texts(tmp_path / "notes.txt", language="en", max_texts=0)


# ---------------------------------------------------------------------------------------------------------
# datasets objects
# ---------------------------------------------------------------------------------------------------------
def _mixed_dataset() -> datasets.Dataset:
    rows = [{"text": t, "lang": "en", "id": i} for i, t in enumerate(PARALLEL["en"])]
    rows += [{"text": t, "lang": "sw", "id": i} for i, t in enumerate(PARALLEL["sw"])]
    return datasets.Dataset.from_list(rows)


def test_dataset_with_language_column_and_fixed_language():
    data = _mixed_dataset()
    texts = load_dataset_texts(data)
    assert texts == {"en": PARALLEL["en"], "sw": PARALLEL["sw"]}
    assert load_dataset_texts(data, languages=["sw"], max_texts=2) == {"sw": PARALLEL["sw"][:2]}
    fixed = load_dataset_texts(data.select_columns(["text"]), language="de", max_texts=4)
    assert fixed == {"de": PARALLEL["en"][:4]}
    renamed = data.rename_column("lang", "locale")
    assert load_dataset_texts(renamed, language_column="locale")["sw"] == PARALLEL["sw"]


def test_iterable_dataset_streams_and_stops_early():
    consumed = []

    def rows():
        for i in range(10_000):
            consumed.append(i)
            yield {"text": f"row {i}", "language": "sw"}

    stream = datasets.IterableDataset.from_generator(rows)
    texts = load_dataset_texts(stream, language_column="language", languages=["sw"], max_texts=3)
    assert texts == {"sw": ["row 0", "row 1", "row 2"]}
    assert len(consumed) < 10_000  # it stopped instead of reading the whole stream


def test_dataset_errors():
    data = _mixed_dataset()
    with pytest.raises(ValueError, match="no 'content' column"):
        load_dataset_texts(data, text_column="content")
    with pytest.raises(ValueError, match="'lang'/'language' column"):
        load_dataset_texts(data.remove_columns(["lang"]))
    with pytest.raises(TypeError, match="pick a split"):
        load_dataset_texts(datasets.DatasetDict({"train": data}))
    with pytest.raises(ValueError, match="not a language tag"):
        load_dataset_texts(datasets.Dataset.from_list([{"text": "x", "lang": "english"}]))


# ---------------------------------------------------------------------------------------------------------
# Hub corpora through an injected load_dataset (the same schemas, read from local files)
# ---------------------------------------------------------------------------------------------------------
class FakeHub:
    """Stands in for ``datasets.load_dataset``: serves tests/fixtures/calibration/hub/<repo>/<config>/<split>.jsonl."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, path, name=None, split=None, streaming=False, **kwargs):
        self.calls.append((path, name, split, streaming, kwargs))
        assert streaming, "Hub corpora must be streamed"
        file = FIXTURES / "hub" / path / name / f"{split}.jsonl"
        if not file.exists():
            raise FileNotFoundError(f"no config {name!r} / split {split!r} in {path}")
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
        return datasets.Dataset.from_list(rows).to_iterable_dataset()


@pytest.mark.parametrize(
    ("loader", "repo", "configs", "prefix"),
    [
        (load_culturax, "uonlp/CulturaX", {"de": "de", "sw": "sw"}, "CulturaX {config}"),
        (
            load_fineweb2,
            "HuggingFaceFW/fineweb-2",
            {"de": "deu_Latn", "sw": "swh_Latn"},
            "FineWeb-2 {config}",
        ),
        (load_mc4, "allenai/c4", {"de": "de", "sw": "sw"}, "mC4 {config}"),
        (
            load_wikipedia,
            "wikimedia/wikipedia",
            {"de": "20231101.de", "sw": "20231101.sw"},
            "Wikipedia {lang}",
        ),
    ],
)
def test_hub_corpora_real_names_and_schemas(loader, repo, configs, prefix):
    hub = FakeHub()
    texts = loader(["de", "sw"], max_texts=4, load_dataset=hub, token="hf_x")
    assert [(c[0], c[1], c[2], c[3]) for c in hub.calls] == [
        (repo, configs[lang], "train", True) for lang in configs
    ]
    assert hub.calls[0][4] == {"token": "hf_x"}
    for lang in ("de", "sw"):
        expected_prefix = prefix.format(config=configs[lang], lang=lang)
        assert [t.split(":", 1)[1].strip() for t in texts[lang]] == PARALLEL[lang][:4]
        assert all(t.startswith(f"{expected_prefix} ") for t in texts[lang])


def test_hub_caps_config_override_and_module_injection(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    texts = load_hub_texts("mc4", "de", max_chars=50)
    assert sum(map(len, texts["de"])) == 50
    assert hub.calls[-1][:4] == ("allenai/c4", "de", "train", True)
    load_hub_texts("fineweb-2", ["sw"], configs={"sw": "swh_Latn"}, max_texts=1)
    assert hub.calls[-1][1] == "swh_Latn"


def test_flores_is_aligned_by_sentence_id():
    hub = FakeHub()
    parallel = load_flores(["en", "de", "sw"], load_dataset=hub)
    assert [c[:4] for c in hub.calls] == [
        ("openlanguagedata/flores_plus", code, "dev", True) for code in ("eng_Latn", "deu_Latn", "swh_Latn")
    ]
    # deu_Latn rows are stored in reverse order: the loader re-aligns them by id.
    assert parallel == {lang: PARALLEL[lang] for lang in ("en", "de", "sw")}
    assert load_flores(["en", "de"], load_dataset=hub, max_texts=2) == {
        "en": PARALLEL["en"][:2],
        "de": PARALLEL["de"][:2],
    }


def test_hub_errors():
    hub = FakeHub()
    with pytest.raises(ValueError, match="unknown Hub corpus"):
        load_hub_texts("oscar", ["de"], load_dataset=hub)
    with pytest.raises(ValueError, match="no English subset"):
        load_fineweb2(["en"], load_dataset=hub)
    with pytest.raises(ValueError, match="splits"):
        load_flores(["en"], split="test", load_dataset=hub)
    with pytest.raises(ValueError, match="not a language tag"):
        load_culturax(["german"], load_dataset=hub)
    with pytest.raises(ValueError, match="max_chars"):
        load_mc4(["de"], max_chars=-5, load_dataset=hub)
    assert hub.calls == []  # every bad argument failed before anything was loaded
