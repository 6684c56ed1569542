"""Calibration sets: packing, shares, seeds, padding, errors; the bundled corpus; translation demonstrations."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from repo_scripts import load_script
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from optimum_mwanda.calibration import (
    CalibrationSet,
    allocate_sequences,
    available_languages,
    build_calibration,
    bundled_corpus_sources,
    default_calibration,
    language_name,
    load_bundled_corpus,
    normalize_language_tag,
    translation_demonstrations,
)
from optimum_mwanda.calibration.corpus import bundled_corpus_manifest

FIXTURES = Path(__file__).parent / "fixtures" / "calibration"
REPO = Path(__file__).resolve().parent.parent
PARALLEL = json.loads((FIXTURES / "parallel.json").read_text(encoding="utf-8"))


def _train_tokenizer(with_bos: bool = True, with_eos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every string encodes, no unknown tokens) trained in memory on bundled text."""
    sample = load_bundled_corpus("calibration", ["en", "de", "sw", "zh", "ar"])
    texts = [line for lines in sample.values() for line in lines[:40]] + PARALLEL["en"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    special = {"pad_token": "<pad>", "bos_token": "<s>"}
    if with_eos:
        special["eos_token"] = "</s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _train_tokenizer()


@pytest.fixture(scope="module")
def texts() -> dict[str, list[str]]:
    corpus = load_bundled_corpus("calibration", ["en", "de", "sw"])
    return {lang: lines[:60] for lang, lines in corpus.items()}


def _n_tokens(tokenizer, texts: list[str]) -> int:
    """Text tokens of a packed stream: every text plus its EOS separator."""
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


# ---------------------------------------------------------------------------------------------------------
# build_calibration
# ---------------------------------------------------------------------------------------------------------
def test_equal_shares_full_sequences_with_bos(tokenizer, texts):
    calib = build_calibration(texts, tokenizer, samples_per_language=3, seq_len=64)
    assert isinstance(calib, CalibrationSet)
    assert calib.input_ids.shape == (9, 64)
    assert calib.languages == ["en"] * 3 + ["de"] * 3 + ["sw"] * 3
    assert calib.token_counts == {"en": 192, "de": 192, "sw": 192}
    assert bool((calib.attention_mask == 1).all())
    assert bool((calib.input_ids[:, 0] == tokenizer.bos_token_id).all())
    # BOS only leads a sequence; the packed text never contains it.
    assert int((calib.input_ids[:, 1:] == tokenizer.bos_token_id).sum()) == 0


def test_packing_joins_whole_texts_with_eos(tokenizer):
    sentences = [
        f"{word} number {i} is here" for i, word in enumerate(["alpha", "beta", "gamma", "delta"] * 5)
    ]
    calib = build_calibration({"en": sentences}, tokenizer, samples_per_language=2, seq_len=48, seed=3)
    eos = tokenizer.eos_token_id
    stream = calib.input_ids[:, 1:].reshape(-1).tolist()  # drop each sequence's BOS, concatenate
    segments, current = [], []
    for token in stream:
        if token == eos:
            segments.append(current)
            current = []
        else:
            current.append(token)
    assert len(segments) >= 3
    # The rows' bodies form one contiguous stream that starts at a text boundary, so every segment ending in
    # EOS is exactly one whole input text (only the unfinished tail after the last EOS is partial).
    for segment in segments:
        assert tokenizer.decode(segment) in sentences
    decoded = [tokenizer.decode(s) for s in segments]
    assert len(set(decoded)) == len(decoded), "a text was packed twice"


def test_same_seed_same_set_other_seed_differs(tokenizer, texts):
    a = build_calibration(texts, tokenizer, samples_per_language=2, seq_len=32, seed=0)
    b = build_calibration(texts, tokenizer, samples_per_language=2, seq_len=32, seed=0)
    c = build_calibration(texts, tokenizer, samples_per_language=2, seq_len=32, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert a.languages == c.languages


def test_a_language_does_not_change_the_others(tokenizer, texts):
    both = build_calibration(texts, tokenizer, samples_per_language=2, seq_len=32, seed=5)
    alone = build_calibration({"sw": texts["sw"]}, tokenizer, samples_per_language=2, seq_len=32, seed=5)
    assert torch.equal(both.select(["sw"]).input_ids, alone.input_ids)


def test_custom_weights_split_the_total(tokenizer, texts):
    calib = build_calibration(
        texts, tokenizer, samples_per_language=4, seq_len=32, weights={"en": 3, "de": 1, "sw": 0}
    )
    assert calib.languages.count("en") == 9
    assert calib.languages.count("de") == 3
    assert "sw" not in calib.languages
    assert calib.token_counts == {"en": 9 * 32, "de": 3 * 32}


def test_allocate_sequences_largest_remainder_and_minimum_one():
    assert allocate_sequences(["a", "b", "c"], 10) == {"a": 4, "b": 3, "c": 3}
    assert allocate_sequences(["a", "b", "c"], 10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert allocate_sequences(["a", "b"], 7, {"a": 0.5, "b": 0.2}) == {"a": 5, "b": 2}
    # A tiny positive weight still gets one sequence; a zero weight gets none.
    assert allocate_sequences(["a", "b", "c"], 4, {"a": 1000, "b": 0.001, "c": 0}) == {"a": 4, "b": 1}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"en": 1, "de": 1}, "no weight for"),
        ({"en": 1, "de": 1, "sw": 1, "fr": 1}, "without text"),
        ({"en": -1, "de": 1, "sw": 1}, ">= 0"),
        ({"en": 0, "de": 0, "sw": 0}, "positive sum"),
        ({"en": float("nan"), "de": 1, "sw": 1}, "finite"),
    ],
)
def test_bad_weights_raise(tokenizer, texts, weights, message):
    with pytest.raises(ValueError, match=message):
        build_calibration(texts, tokenizer, samples_per_language=2, seq_len=32, weights=weights)


def test_too_little_text_reports_the_counts(tokenizer):
    short = ["Habari ya asubuhi.", "Karibu sana."]
    have = _n_tokens(tokenizer, short)
    with pytest.raises(ValueError) as info:
        build_calibration({"sw": short}, tokenizer, samples_per_language=4, seq_len=64)
    message = str(info.value)
    assert f"has {have} tokens" in message
    assert f"need {4 * 63} text tokens" in message
    assert "'sw'" in message


def test_padding_is_masked_and_never_counted(tokenizer):
    short = ["Habari ya asubuhi, rafiki yangu.", "Karibu sana nyumbani kwetu leo."] * 3
    have = _n_tokens(tokenizer, short)
    seq_len = 16
    calib = build_calibration(
        {"sw": short}, tokenizer, samples_per_language=50, seq_len=seq_len, allow_padding=True
    )
    n = math.ceil(have / (seq_len - 1))
    assert len(calib) == n < 50
    # All text tokens plus one BOS per sequence, nothing for padding.
    assert calib.token_counts["sw"] == have + n
    assert int(calib.attention_mask.sum()) == have + n
    last = calib.attention_mask[-1]
    n_pad = seq_len - int(last.sum())
    assert n_pad > 0
    assert last[-n_pad:].sum() == 0 and bool((last[:-n_pad] == 1).all())
    assert bool((calib.input_ids[-1, -n_pad:] == tokenizer.pad_token_id).all())
    assert bool((calib.attention_mask[:-1] == 1).all())


def test_tokenizer_without_bos_and_forced_bos(texts):
    no_bos = _train_tokenizer(with_bos=False)
    calib = build_calibration({"en": texts["en"]}, no_bos, samples_per_language=2, seq_len=32)
    assert calib.token_counts == {"en": 64}
    assert int((calib.input_ids == no_bos.bos_token_id).sum()) == 0
    forced = build_calibration({"en": texts["en"]}, no_bos, samples_per_language=2, seq_len=32, add_bos=True)
    assert bool((forced.input_ids[:, 0] == no_bos.bos_token_id).all())


def test_tokenizer_without_eos(texts):
    no_eos = _train_tokenizer(with_eos=False)
    assert no_eos.eos_token_id is None
    with pytest.raises(ValueError, match="no EOS token"):
        build_calibration({"en": texts["en"]}, no_eos, samples_per_language=1, seq_len=16)
    # One text needs no separator.
    one = build_calibration({"en": " ".join(texts["en"][:5])}, no_eos, samples_per_language=1, seq_len=16)
    assert one.input_ids.shape == (1, 16)


@pytest.mark.parametrize("tag", ["english", "e1", "", "de-", "zh-Hans-CN-x", "12"])
def test_malformed_language_tags_raise_naming_them(tokenizer, tag):
    with pytest.raises(ValueError, match=re.escape(repr(tag))):
        build_calibration({tag: ["some text here"]}, tokenizer, samples_per_language=1, seq_len=4)


def test_language_tags_are_canonicalised(tokenizer, texts):
    assert normalize_language_tag("ZH_hans") == "zh-Hans"
    assert normalize_language_tag("pt-br") == "pt-BR"
    assert normalize_language_tag("es-419") == "es-419"
    assert normalize_language_tag("swh") == "swh"
    calib = build_calibration({"DE": texts["de"]}, tokenizer, samples_per_language=1, seq_len=16)
    assert calib.languages == ["de"]
    with pytest.raises(ValueError, match="given twice"):
        build_calibration(
            {"de": texts["de"], "DE": texts["de"]}, tokenizer, samples_per_language=1, seq_len=16
        )


def test_input_errors(tokenizer, texts):
    with pytest.raises(ValueError, match="empty"):
        build_calibration({}, tokenizer)
    with pytest.raises(ValueError, match="'sw' has no text"):
        build_calibration(
            {"en": texts["en"], "sw": ["", "   "]}, tokenizer, samples_per_language=1, seq_len=8
        )
    with pytest.raises(TypeError, match="must be strings"):
        build_calibration({"en": [1, 2]}, tokenizer, samples_per_language=1, seq_len=8)
    with pytest.raises(TypeError, match="mapping"):
        build_calibration(["text"], tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        build_calibration(texts, None)
    with pytest.raises(ValueError, match="seq_len"):
        build_calibration(texts, tokenizer, seq_len=0)
    with pytest.raises(ValueError, match="samples_per_language"):
        build_calibration(texts, tokenizer, samples_per_language=True)


def test_sources_are_recorded(tokenizer, texts):
    calib = build_calibration(
        texts, tokenizer, samples_per_language=1, seq_len=16, sources={"en": "corpus A", "fr": "unused"}
    )
    assert calib.sources == {"en": "corpus A"}


# ---------------------------------------------------------------------------------------------------------
# bundled corpus
# ---------------------------------------------------------------------------------------------------------
def test_bundled_corpus_languages_and_sizes():
    languages = available_languages()
    assert {"ar", "de", "en", "es", "ru", "sw", "zh"} <= set(languages)
    calibration = load_bundled_corpus("calibration")
    heldout = load_bundled_corpus("heldout")
    assert list(calibration) == languages == list(heldout)
    manifest = bundled_corpus_manifest()["languages"]
    for lang in languages:
        cal_chars = sum(map(len, calibration[lang]))
        held_chars = sum(map(len, heldout[lang]))
        # zh/ja are dense (about one token per character); the others have far more characters.
        assert cal_chars >= 50_000, lang
        assert held_chars >= 6_000, lang
        assert len(calibration[lang]) == manifest[lang]["calibration"]["lines"]
        assert len(heldout[lang]) == manifest[lang]["heldout"]["lines"]
        # The recorded Gemma-3 token counts promise >= 4 held-out windows of 512 tokens everywhere.
        assert manifest[lang]["heldout"]["tokens"] >= 4 * 512, lang
        assert all("\n" not in line and line == line.strip() and line for line in calibration[lang])


def test_bundled_calibration_and_heldout_never_overlap():
    calibration = load_bundled_corpus("calibration")
    heldout = load_bundled_corpus("heldout")
    for lang in calibration:
        assert not set(calibration[lang]) & set(heldout[lang]), lang
        assert len(set(calibration[lang])) == len(calibration[lang]), f"{lang}: duplicate lines"


def test_bundled_corpus_selection_and_errors():
    assert list(load_bundled_corpus("heldout", ["sw", "de"])) == ["sw", "de"]
    assert list(load_bundled_corpus(languages="ru")) == ["ru"]
    assert list(load_bundled_corpus(languages=["SW", "zh"])) == ["sw", "zh"]
    with pytest.raises(ValueError, match="'english' is not a language tag"):
        load_bundled_corpus(languages=["english"])
    with pytest.raises(ValueError, match="available: ar, ") as info:
        load_bundled_corpus(languages=["de", "yo"])
    assert "'yo'" in str(info.value)
    with pytest.raises(ValueError, match="split"):
        load_bundled_corpus("test")
    sources = bundled_corpus_sources()
    assert sources["sw"].startswith("Kolibri") and "0.19.5" in sources["sw"]
    assert sources["de"].startswith("The Debian Administrator's Handbook")


def test_bundled_licences_are_shipped():
    data = REPO / "optimum_mwanda" / "calibration" / "data"
    licences = (data / "LICENSES.md").read_text(encoding="utf-8")
    for needle in ("CC-BY-SA-3.0", "GPL-2.0+", "Raphaël Hertzog", "MIT License", "Learning Equality"):
        assert needle in licences
    total = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    assert total < 6_000_000


def test_default_calibration_from_bundled_corpus(tokenizer):
    calib = default_calibration(tokenizer, languages=["sw", "zh", "ar"], samples_per_language=2, seq_len=128)
    assert calib.language_list == ["sw", "zh", "ar"]
    assert calib.token_counts == {"sw": 256, "zh": 256, "ar": 256}
    assert calib.sources["sw"] == bundled_corpus_sources()["sw"]
    again = default_calibration(tokenizer, languages=["sw", "zh", "ar"], samples_per_language=2, seq_len=128)
    assert torch.equal(calib.input_ids, again.input_ids)


# ---------------------------------------------------------------------------------------------------------
# translation demonstrations
# ---------------------------------------------------------------------------------------------------------
def test_translation_demonstration_format_and_alignment():
    parallel = {lang: PARALLEL[lang] for lang in ("en", "de", "sw")}
    demos = translation_demonstrations(parallel, shots=2, seed=0)
    assert list(demos) == ["de", "en", "sw"]  # targets in order of first appearance: en->de, de->en, en->sw
    pairs = {("English", "German"): ("en", "de"), ("German", "English"): ("de", "en")}
    pairs.update({("English", "Swahili"): ("en", "sw"), ("Swahili", "English"): ("sw", "en")})
    line = re.compile(r"([A-Z][a-z]+): ([^\n]+)\n")
    for target, texts in demos.items():
        for text in texts:
            parts = line.findall(text)
            assert "".join(f"{name}: {sentence}\n" for name, sentence in parts) == text
            assert len(parts) == 4  # two shots, source and target each
            for (src_name, src), (tgt_name, tgt) in zip(parts[::2], parts[1::2]):
                src_lang, tgt_lang = pairs[(src_name, tgt_name)]
                assert tgt_lang == target
                assert PARALLEL[src_lang].index(src) == PARALLEL[tgt_lang].index(tgt)
            sources = [s for _, s in parts[::2]]
            assert len(set(sources)) == 2, "a demonstration repeats an example"
    # 6 sentences / 2 shots = 3 demonstrations per direction; "en" collects de->en and sw->en.
    assert len(demos["de"]) == 3 and len(demos["sw"]) == 3 and len(demos["en"]) == 6


def test_translation_demonstrations_seeded_eos_and_names(tokenizer):
    parallel = {lang: PARALLEL[lang] for lang in ("en", "fr")}
    a = translation_demonstrations(parallel, shots=3, seed=1, tokenizer=tokenizer)
    b = translation_demonstrations(parallel, shots=3, seed=1, tokenizer=tokenizer)
    c = translation_demonstrations(parallel, shots=3, seed=2, tokenizer=tokenizer)
    assert a == b and a != c
    assert all(text.count("</s>") == 6 and text.startswith("English: ") for text in a["fr"])
    custom = translation_demonstrations(
        parallel, pairs=[("fr", "en")], shots=1, demonstrations_per_pair=8, names={"fr": "Français"}
    )
    assert list(custom) == ["en"] and len(custom["en"]) == 8
    assert all(text.startswith("Français: ") and "\nEnglish: " in text for text in custom["en"])
    assert language_name("pt-BR") == "Portuguese"


def test_translation_demonstrations_errors():
    with pytest.raises(ValueError, match="not aligned"):
        translation_demonstrations({"en": PARALLEL["en"], "de": PARALLEL["de"][:-1]})
    with pytest.raises(ValueError, match="pivot"):
        translation_demonstrations({"de": PARALLEL["de"], "fr": PARALLEL["fr"]})
    with pytest.raises(ValueError, match="fewer than shots"):
        translation_demonstrations({"en": PARALLEL["en"], "de": PARALLEL["de"]}, shots=7)
    with pytest.raises(ValueError, match="'qaa' is not a language tag"):  # private use: no language
        translation_demonstrations({"en": ["a b"], "qaa": ["c d"]}, shots=1)
    with pytest.raises(ValueError, match="not in the parallel corpus"):
        translation_demonstrations({"en": PARALLEL["en"], "de": PARALLEL["de"]}, pairs=[("en", "sw")])


def test_translation_demonstrations_calibrate(tokenizer):
    demos = translation_demonstrations({lang: PARALLEL[lang] for lang in ("en", "de", "sw")}, shots=2)
    calib = build_calibration(demos, tokenizer, samples_per_language=1, seq_len=24)
    assert calib.language_list == ["de", "en", "sw"]
    assert calib.token_counts == {"de": 24, "en": 24, "sw": 24}


# ---------------------------------------------------------------------------------------------------------
# the corpus build script's text extraction
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def build_corpus():
    return load_script("scripts/build_corpus.py")


def test_icu_messages_render_their_other_branch(build_corpus):
    render = build_corpus.render_icu
    assert render("{count, plural, one {Mwalimu amewekwa} other {Walimu wamewekwa}}") == "Walimu wamewekwa"
    assert render("Ukurasa {number, number} kati ya {total, number}") == "Ukurasa 3 kati ya 3"
    assert render("{n, plural, one {# swali} other {# maswali}} yamechaguliwa") == "3 maswali yamechaguliwa"
    with pytest.raises(build_corpus.PlaceholderError):
        render("Rudi kwenye '{lesson}'")
    lines = build_corpus.swahili_lines(
        [
            ("a", "{ name }"),
            ("a", "GB {n, number}"),
            ("a", "Hifadhi"),
            ("a", "Hifadhi"),
            ("b", "Karibu tena!"),
        ]
    )
    assert lines == ["Hifadhi. Karibu tena!"]


def test_handbook_paragraph_extraction(build_corpus):
    html = (
        '<html><head><link rel="next" href="b.html" /></head><body>'
        '<div class="para">Use <code class="command">apt</code> to install\n\t packages.</div>'
        '<pre class="screen"># apt install foo</pre>'
        '<div class="para">Run this:<pre class="screen">$ ls</pre></div>'
        '<div class="titlepage"><h2 class="title">1.2. Title</h2></div></body></html>'
    )
    parser = build_corpus._ParagraphParser()
    parser.feed(html)
    assert parser.paragraphs == ["Use apt to install packages.", "Run this:"]
    assert parser.next_page == "b.html"
    english = {"An untranslated paragraph about the packages."}
    assert not build_corpus.is_in_language("An untranslated paragraph about the packages.", "de", english)
    assert not build_corpus.is_in_language(
        "This is the way that the packages are built with the tools.", "de", set()
    )
    assert build_corpus.is_in_language(
        "Die Pakete werden mit diesen Werkzeugen gebaut und installiert.", "de", set()
    )
    assert build_corpus.is_in_language("Пакеты собираются этими инструментами.", "ru", set())
    assert not build_corpus.is_in_language("Packages are built with these tools.", "ru", set())


def test_corpus_split_has_a_gap_and_no_overlap(build_corpus):
    lines = [f"paragraph {i}" for i in range(100)] + ["paragraph 3"]
    calibration, heldout = build_corpus.split_lines(lines, 0.10)
    assert calibration == lines[:85]
    assert heldout == lines[91:100]  # the repeated "paragraph 3" at the end is dropped from held-out
    capped = build_corpus.cap_lines(lines[:85], 200, "x")
    assert sum(len(line) + 1 for line in capped) <= 200
    assert capped == [line for line in lines[:85] if line in capped]  # order kept
    assert capped == build_corpus.cap_lines(lines[:85], 200, "x")
