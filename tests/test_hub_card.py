"""Model cards: metadata (languages, base model, licence, tags, per-language results), body and plot."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hub_fixtures import FIFTEEN_LANGUAGES, make_report, prune_by_magnitude, tiny_llama
from huggingface_hub import ModelCard

from optimum_mwanda import verify_sparsity
from optimum_mwanda.calibration.languages import resolve_language
from optimum_mwanda.hub import create_model_card

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    model = tiny_llama(seed=3, layers=4)
    prune_by_magnitude(model, [0.45, 0.48, 0.52, 0.55])
    return model


def _reparse(card: ModelCard) -> ModelCard:
    """The card as the Hub would read it back from README.md text."""
    return ModelCard(str(card))


def _table_row(text: str, first_cell: str, section: str = "") -> list[str]:
    """The cells of the first table row starting with ``first_cell`` below the heading ``section``."""
    for line in text[text.index(section) :].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def test_template_shipped_in_the_package_matches_the_repository_copy():
    packaged = ROOT / "optimum_mwanda" / "hub" / "model_card_template.md"
    assert packaged.read_text(encoding="utf-8") == (ROOT / "model_card_template.md").read_text(
        encoding="utf-8"
    )


def test_one_language_card(model, tmp_path):
    report = make_report(model, ["sw"], method="wanda", sources={"sw": "facebook/flores"})
    evals = {"before": {"sw": 20.0}, "after": {"sw": 25.5}}
    card = create_model_card(
        report,
        base_model="google/gemma-3-270m",
        eval_results=evals,
        model_id="alice/gemma-3-270m-wanda-sw",
        license="gemma",
        plot_path=tmp_path / "sparsity_per_layer.png",
    )
    data = _reparse(card).data
    assert data.language == ["sw"]
    assert data.base_model == "google/gemma-3-270m"
    assert data.library_name == "transformers"
    assert data.license == "gemma"
    assert data.datasets == ["facebook/flores"]
    assert {"pruned", "sparse", "wanda", "multilingual"} <= set(data.tags)
    assert data.model_name == "alice/gemma-3-270m-wanda-sw"
    assert len(data.eval_results) == 1
    result = data.eval_results[0]
    assert (result.metric_type, result.metric_value, result.dataset_config) == ("perplexity", 25.5, "sw")

    text = card.text
    assert "using calibration text in Swahili" in text
    assert "1 language, 4,096 tokens in total." in text
    assert _table_row(text, "Swahili", "## Evaluation")[1:] == ["`sw`", "20.00", "25.50", "+27.5%"]
    assert "**Mean**" not in text  # a mean of one language says nothing
    assert "calibrated on one language only" in text
    assert 'from_pretrained("alice/gemma-3-270m-wanda-sw")' in text
    # Citations follow the run: Wanda and language-specific calibration, not M-Wanda or SparseGPT.
    assert "sun2024wanda" in text and "kurz2024calibration" in text
    assert "choenni2025mwanda" not in text and "frantar2023sparsegpt" not in text
    assert "![Sparsity per decoder layer](sparsity_per_layer.png)" in text
    # Rows of the per-layer table: the target schedule and what the weights show.
    measured = verify_sparsity(model).layer_sparsity[3]
    assert _table_row(text, "3", "## Sparsity per layer") == ["3", "50.0%", f"{100 * measured:.1f}%"]


def test_fifteen_language_card(model, tmp_path):
    report = make_report(model, FIFTEEN_LANGUAGES, method="mwanda", layerwise="owl")
    before = {lang: 10.0 + i for i, lang in enumerate(FIFTEEN_LANGUAGES)}
    after = {lang: 12.0 + 1.5 * i for i, lang in enumerate(FIFTEEN_LANGUAGES)}
    plot = tmp_path / "sparsity_per_layer.png"
    card = create_model_card(
        report, base_model="org/base", eval_results={"before": before, "after": after}, plot_path=plot
    )
    data = _reparse(card).data
    assert data.language == FIFTEEN_LANGUAGES
    assert len(data.eval_results) == 15
    assert {r.dataset_config: r.metric_value for r in data.eval_results} == after
    assert "mwanda" in data.tags

    text = card.text
    assert "15 languages, " in text
    for lang in ("English", "Yoruba", "Urdu", "Finnish"):
        row = _table_row(text, lang, "## Evaluation")
        code = resolve_language(row[1].strip("`")).code
        assert float(row[2]) == before[code] and float(row[3]) == after[code]
    mean_before, mean_after = math.prod(before.values()) ** (1 / 15), math.prod(after.values()) ** (1 / 15)
    assert _table_row(text, "**Geometric mean**")[2:4] == [f"{mean_before:,.2f}", f"{mean_after:,.2f}"]
    assert "OWL (outlier-weighted)" in text
    for key in ("choenni2025mwanda", "sun2024wanda", "yin2024owl", "kurz2024calibration"):
        assert key in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5_000


def test_nm_sparsegpt_card_on_english_only(model):
    report = make_report(model, ["en"], method="sparsegpt", mask_structure="2:4")
    text = create_model_card(report).text
    assert "2:4 (at most 2 non-zeros in every 4 consecutive input weights)" in text
    assert "sparse tensor cores" in text
    assert "frantar2023sparsegpt" in text
    assert "sun2024wanda" not in text and "kurz2024calibration" not in text
    assert "No evaluation results were recorded" in text


def test_translation_calibration_cites_kim_et_al(model):
    report = make_report(model, ["en", "de"], sources={"en": "flores translation demonstrations"})
    card = create_model_card(report)
    assert "kim2024pruning" in card.text
    assert card.data.datasets is None  # a description is not a dataset id


def test_language_tags_are_normalised_to_iso_codes(model):
    report = make_report(model, ["swh_Latn", "pt-BR", "zh-Hans", "zh-Hant", "fre"])
    data = _reparse(create_model_card(report)).data
    # "fre" is the bibliographic code of French: one language, one canonical tag ("fr").
    assert data.language == ["swh", "pt", "zh", "fr"]
    assert "| Simplified Chinese | `zh-Hans` |" in create_model_card(report).text


@pytest.mark.parametrize(
    ("languages", "evals", "bad"),
    [
        (["en", "xx"], None, "'xx'"),
        (["en"], {"after": {"klingon": 3.0}}, "'klingon'"),
        (["en", "e1"], None, "'e1'"),
    ],
)
def test_invalid_language_codes_are_rejected(model, languages, evals, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        create_model_card(make_report(model, languages), eval_results=evals)


@pytest.mark.parametrize(
    ("evals", "message"),
    [
        ({"after": {"en": -1.0}}, "positive finite perplexity"),
        ({"after": {"en": float("nan")}}, "positive finite perplexity"),
        ({"later": {"en": 3.0}}, "'before' and/or 'after'"),
        ({"after": [3.0]}, "map language codes"),
    ],
)
def test_malformed_eval_results_are_rejected(model, evals, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        create_model_card(make_report(model, ["en"]), eval_results=evals)


def test_bad_base_model_id_is_rejected(model):
    with pytest.raises(ValueError, match="invalid base_model"):
        create_model_card(make_report(model, ["en"]), base_model="../some/local/../path")


def test_licence_is_carried_from_a_local_base_model_card(model, tmp_path):
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Base\n")
    report = make_report(model, ["en"])
    report.base_model = str(base)  # the pruner records name_or_path: here a local folder
    data = _reparse(create_model_card(report)).data
    assert data.license == "apache-2.0"
    assert data.base_model is None  # a local path is not a Hub id


def test_licence_is_carried_from_the_hub_cache(model, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--google--gemma-3-270m" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: gemma\nlibrary_name: transformers\n---\n")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    report = make_report(model, ["en"])
    report.base_model = "google/gemma-3-270m"
    data = _reparse(create_model_card(report)).data
    assert data.base_model == "google/gemma-3-270m"
    assert data.license == "gemma"
    assert _reparse(create_model_card(report, license="mit")).data.license == "mit"  # a parameter wins


def test_card_says_how_the_kept_weights_were_changed(model):
    mwanda = str(create_model_card(make_report(model, ["en", "sw"], method="mwanda")))
    assert "restore the row's mean output in every calibration language" in mwanda
    assert "| `mean_compensation` | language |" in mwanda
    wanda = str(create_model_card(make_report(model, ["en", "sw"], method="wanda")))
    assert "No weight was retrained." in wanda and "restore the row's mean output" not in wanda


def test_card_shows_only_the_calibration_knobs_that_applied(model):
    report = make_report(model, ["en", "sw"])
    report.calibration_settings = {"seq_len": 128}  # token ids were given: no sampling knobs applied
    text = create_model_card(report).text
    assert "| `calibration seq_len` | 128 |" in text
    assert "samples_per_language" not in text and "`seed`" not in text and "calibration_seq_len" not in text
    report.calibration_settings = {"seq_len": 512, "sequences_per_language": {"en": 8, "sw": 8}, "seed": 3}
    text = create_model_card(report).text
    assert "| `calibration sequences_per_language` | 8 per language |" in text
    assert "| `calibration seed` | 3 |" in text
    report.calibration_settings = {"seq_len": 512, "sequences_per_language": {"en": 8, "sw": 6}}
    assert "| `calibration sequences_per_language` | en 8, sw 6 |" in create_model_card(report).text


def test_card_mean_is_the_geometric_mean_and_says_so(model):
    evals = {"before": {"en": 10.0, "sw": 1000.0}, "after": {"en": 20.0, "sw": 2000.0}}
    text = create_model_card(make_report(model, ["en", "sw"]), eval_results=evals).text
    assert _table_row(text, "**Geometric mean**")[2:4] == ["100.00", "200.00"]  # not 505 / 1010


def test_language_case_and_aliases_are_one_language_in_the_card(model):
    evals = {"after": {"EN": 20.0, "sw": 30.0}}
    data = _reparse(create_model_card(make_report(model, ["en", "sw"]), eval_results=evals)).data
    assert data.language == ["en", "sw"]
    assert {r.dataset_config: r.metric_value for r in data.eval_results} == {"en": 20.0, "sw": 30.0}
    with pytest.raises(ValueError, match="two perplexities for language 'en'"):
        create_model_card(make_report(model, ["en"]), eval_results={"after": {"en": 2.0, "EN": 3.0}})


def test_user_strings_are_escaped_where_they_land_and_repo_ids_validated(model):
    """Issue 30.9: calibration source names, ignore patterns, eval_dataset, downstream task names and the
    model id never become Markdown or HTML of their own."""
    import dataclasses

    attack = "x | <img src=x onerror=alert(1)>"
    report = make_report(model, ["en", "sw"], sources={"en": attack, "sw": "a\nb"})
    report.config = dataclasses.replace(report.config, ignore=["*.o_proj|<b>x</b>"])
    evals = {"after": {"en": 10.0}, "downstream": {attack: {"acc": 0.55, "acc_stderr": 0.05}}}
    text = create_model_card(report, eval_results=evals, eval_dataset=attack + "\n# heading").text
    assert "<img" not in text and "<b>" not in text and "\n# heading" not in text
    assert "x \\| &lt;img src=x onerror=alert(1)&gt;" in text  # one table cell, shown literally
    row = next(line for line in text.splitlines() if line.startswith("| English | `en` | 4,096"))
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]  # GFM: "\|" is no border
    assert cells == ["English", "`en`", "4,096", "x \\| &lt;img src=x onerror=alert(1)&gt;"]
    assert "<code>*.o_proj&#124;&lt;b&gt;x&lt;/b&gt;</code>" in text
    assert "| Swahili | `sw` | 4,224 | a b |" in text  # the newline does not end the row
    with pytest.raises(ValueError, match="invalid model_id"):
        create_model_card(report, model_id="me/x\n<script>")


def test_downstream_standard_errors_are_shown_and_kept_in_the_model_index(model):
    evals = {"downstream": {"mwanda_continuation_sw": {"acc": 0.55, "acc_stderr": 0.05}}}
    card = create_model_card(make_report(model, ["sw"]), eval_results=evals)
    assert "| `mwanda_continuation_sw` | acc 0.550 ± 0.050 |" in card.text
    results = {r.metric_type: r.metric_value for r in _reparse(card).data.eval_results}
    assert results == {"acc": 0.55, "acc_stderr": 0.05}


def test_the_card_reads_the_stride_from_the_report_and_prints_no_raw_none(model):
    import dataclasses

    from optimum_mwanda import MWandaConfig

    report = make_report(model, ["en"], mask_structure="2:4")
    assert "None" not in create_model_card(report).text.split("## Calibration data")[0]
    assert "| `hessian_token_stride` | auto |" in create_model_card(report).text  # not resolved: says so
    report.config = MWandaConfig(mask_structure="2:4").resolve(10_000, [64, 128])
    text = create_model_card(report).text
    assert "| `hessian_token_stride` | auto: 4 for 64-feature inputs; 4 for 128-feature inputs |" not in text
    assert "| `hessian_token_stride` | 4 |" in text  # what the report holds (the same for both widths)
    report.config = dataclasses.replace(report.config, weight_update=dataclasses.replace(
        report.config.weight_update, hessian_token_stride={64: 3, 128: 2}))  # fmt: skip
    assert "| `hessian_token_stride` | auto: 3 for 64-feature inputs; 2 for 128-feature inputs |" in (
        create_model_card(report).text
    )
