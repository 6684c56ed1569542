"""One language module for the whole package: BCP-47 tags validated and normalised with langcodes."""

from __future__ import annotations

import pytest
import torch
from hub_fixtures import make_report, tiny_llama
from tiny_models import make_model

from optimum_mwanda import Pruner, WandaConfig
from optimum_mwanda.calibration import CalibrationSet
from optimum_mwanda.calibration.languages import language_name, normalize_language_tag, resolve_language


@pytest.mark.parametrize(
    ("tag", "canonical"),
    [("en", "en"), ("EN", "en"), ("eng", "en"), ("zh_hans", "zh-Hans"), ("PT-br", "pt-BR"), ("es-419", "es-419"),
     (" sw ", "sw"), ("swh", "swh"), ("iw", "he"), ("xh", "xh")],
)  # fmt: skip
def test_tags_are_normalised(tag, canonical):
    assert normalize_language_tag(tag) == canonical


@pytest.mark.parametrize(
    "tag", ["xx-INVALID", "", "xx", "english", "e1", "x-private", "und", "qaa", "en--US"]
)
def test_invalid_tags_are_rejected(tag):
    with pytest.raises(ValueError, match="is not a language tag"):
        normalize_language_tag(tag)


@pytest.mark.parametrize("tag", [5, None, b"en"])
def test_non_strings_are_rejected(tag):
    with pytest.raises(TypeError, match="must be a string"):
        normalize_language_tag(tag)


def test_names_and_codes():
    assert language_name("de") == "German" and language_name("pt-BR") == "Portuguese"
    assert language_name("swh") == "Swahili"  # from langcodes, "(individual language)" dropped
    assert resolve_language("zh_Hans").code == "zh" and resolve_language("zh_Hans").tag == "zh-Hans"


def test_calibration_set_normalises_and_merges_case_variants():
    ids = torch.randint(0, 100, (4, 8))
    calibration = CalibrationSet(ids, None, ["en", "EN", "sw", "SW"], sources={"EN": "bundled"})
    assert calibration.language_list == ["en", "sw"] and calibration.sources == {"en": "bundled"}
    assert calibration.token_counts == {"en": 16, "sw": 16}
    # Mapping keys follow the rule of text calibration: two spellings of one language are refused.
    with pytest.raises(ValueError, match="given twice"):
        CalibrationSet.from_token_ids({"en": ids[:2], "EN": ids[2:]})
    assert calibration.select(["SW"]).language_list == ["sw"]


@pytest.mark.parametrize("bad", ["xx-INVALID", "", 5])
def test_a_bad_tag_fails_before_any_weight_changes(bad):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match="language tag"):
        Pruner(WandaConfig(sparsity=0.5)).prune_model(
            model, {"en": torch.randint(0, 100, (2, 8)), bad: torch.randint(0, 100, (2, 8))}
        )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_card_and_cli_use_the_same_validation():
    from optimum_mwanda.cli.errors import UsageError
    from optimum_mwanda.cli.options import parse_languages
    from optimum_mwanda.hub import create_model_card

    assert parse_languages(["EN", "en", "de"]) == ["en", "de"]
    with pytest.raises(UsageError, match="'xx-INVALID' is not a language tag"):
        parse_languages(["xx-INVALID"])
    with pytest.raises(ValueError, match="'xx-INVALID' is not a language tag"):
        create_model_card(make_report(tiny_llama(seed=1), ["en", "xx-INVALID"]))
