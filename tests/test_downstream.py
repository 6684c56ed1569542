"""Offline downstream evaluation: the bundled lm-eval tasks, run by lm-eval itself on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import make_model, make_tokenizer

pytest.importorskip("lm_eval")
pytest.importorskip("sacrebleu")

from optimum_mwanda.calibration.corpus import available_languages  # noqa: E402
from optimum_mwanda.evaluation import harness  # noqa: E402
from optimum_mwanda.evaluation.tasks import (  # noqa: E402
    TASKS_DIR,
    subtask_names,
    task_languages,
    tasks_manifest,
)
from optimum_mwanda.evaluation.tasks.loader import DATA_DIR, read_jsonl  # noqa: E402

CALIBRATION = TASKS_DIR.parent.parent / "calibration" / "data" / "calibration"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama", seed=3), make_tokenizer()


def _calibration(lang: str) -> str:
    return (CALIBRATION / f"{lang}.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# the shipped task files
# ---------------------------------------------------------------------------------------------------------
def test_every_bundled_language_has_a_continuation_task_and_sizes_match_the_manifest():
    sizes = tasks_manifest()["sizes"]
    assert task_languages("mwanda_continuation") == available_languages()
    # Swahili (Kolibri's interface strings) has no parallel English text; English is the pivot.
    assert set(task_languages("mwanda_translation")) == set(available_languages()) - {"en", "sw"}
    for lang, size in sizes.items():
        items = read_jsonl(DATA_DIR / "continuation" / f"{lang}.jsonl")
        assert len(items) == size["continuation"] >= 20
        for item in items:
            assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
            assert 0 <= item["label"] < 4 and item["context"]
        if size["translation_test"]:
            test = read_jsonl(DATA_DIR / "translation" / f"{lang}.test.jsonl")
            fewshot = read_jsonl(DATA_DIR / "translation" / f"{lang}.fewshot.jsonl")
            assert len(test) == size["translation_test"] and len(fewshot) == size["translation_fewshot"]
            assert not {row["en"] for row in test} & {row["en"] for row in fewshot}
            assert all(row["en"] != row[lang] for row in test)
    total = sum(f.stat().st_size for f in DATA_DIR.rglob("*") if f.is_file())
    assert total < 1_000_000  # small enough to ship in the wheel


def test_no_task_sentence_is_calibration_text():
    """The builder's guarantee, checked again on the shipped files: calibration never leaks into a task."""
    for lang in task_languages("mwanda_continuation"):
        calibration = _calibration(lang)
        for item in read_jsonl(DATA_DIR / "continuation" / f"{lang}.jsonl"):
            for sentence in [*item["context"], *item["choices"]]:
                assert sentence not in calibration, (lang, sentence)
    english = _calibration("en")
    for lang in task_languages("mwanda_translation"):
        calibration = _calibration(lang)
        for split in ("test", "fewshot"):
            for row in read_jsonl(DATA_DIR / "translation" / f"{lang}.{split}.jsonl"):
                assert row["en"] not in english and row[lang] not in calibration, (lang, row["id"])


def test_lm_eval_finds_the_tasks_and_groups_through_include_path():
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    for name in ("mwanda_continuation", "mwanda_translation_en_xx", "mwanda_translation_xx_en"):
        assert name in manager.all_groups
    expected = subtask_names("mwanda_continuation") + subtask_names("mwanda_translation")
    assert set(expected) <= set(manager.all_subtasks)
    tasks = get_task_dict(["mwanda_continuation_de", "mwanda_translation_en-zh"], manager)
    mc, mt = tasks["mwanda_continuation_de"], tasks["mwanda_translation_en-zh"]
    doc = mc.test_docs()[0]
    assert mc.doc_to_choice(doc) == doc["choices"] and mc.doc_to_target(doc) == doc["label"]
    assert mc.doc_to_text(doc) == " ".join(doc["context"])
    doc = mt.test_docs()[0]
    assert mt.doc_to_text(doc) == f"English: {doc['en']}\nChinese:" and mt.doc_to_target(doc) == doc["zh"]
    assert len(mt.fewshot_docs()) == 3


def test_expand_tasks():
    assert harness.expand_tasks("mwanda_continuation", ["de", "sw"]) == [
        "mwanda_continuation_de",
        "mwanda_continuation_sw",
    ]
    assert harness.expand_tasks(["mwanda_translation", "xnli_de"], ["sw", "de"]) == [
        "mwanda_translation_en-de",
        "mwanda_translation_de-en",
        "xnli_de",
    ]
    with pytest.raises(ValueError, match="no subtask"):
        harness.expand_tasks("mwanda_translation", ["sw"])
    with pytest.raises(ValueError, match="at least one"):
        harness.expand_tasks(" , ")


# ---------------------------------------------------------------------------------------------------------
# lm-eval end to end on a tiny model
# ---------------------------------------------------------------------------------------------------------
TASKS = ["mwanda_continuation_de", "mwanda_continuation_zh", "mwanda_translation_en-de"]
LIMIT = 4


def _run(model, tokenizer):
    return harness.run_downstream(model, tokenizer, TASKS, limit=LIMIT, show_progress=False, max_length=1024)


def test_run_downstream_end_to_end_and_a_perturbed_model_scores_differently(tiny):
    model, tokenizer = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _run(model, tokenizer)
    assert sorted(result.tasks) == sorted(TASKS)
    assert all(result.samples[name] == LIMIT for name in TASKS)
    for lang in ("de", "zh"):
        row = result.by_language[lang]
        assert 0.0 <= row["continuation_acc"] <= 1.0 and 0.0 <= row["continuation_acc_norm"] <= 1.0
        # LIMIT documents: an accuracy is a multiple of 1/LIMIT
        assert math.isclose(
            row["continuation_acc"] * LIMIT, round(row["continuation_acc"] * LIMIT), abs_tol=1e-9
        )
    assert 0.0 <= result.by_language["de"]["chrf_en_xx"] <= 100.0
    assert set(result.means()) == {"continuation_acc", "continuation_acc_norm", "chrf_en_xx"}
    assert "continuation_acc" in result.format_table()
    assert json.loads(result.to_json())["by_language"]["de"] == result.by_language["de"]
    assert harness.DownstreamResult.from_dict(result.to_dict()).by_language == result.by_language
    assert result.settings["lm_eval_version"]

    perturbed = make_model("llama", seed=3)
    with torch.no_grad():
        for layer in perturbed.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
    other = _run(perturbed, tokenizer)
    assert other.tasks != result.tasks
    # The model was left as it was (eval mode; the harness changes no weight).
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_eval_results_go_into_the_model_card(tiny):
    from optimum_mwanda.hub.card import _check_eval_results

    downstream = {
        "mwanda_continuation_de": {"acc": 0.4, "acc_stderr": 0.1},
        "mwanda_translation_en-de": {"chrf": 31.2},
    }
    entries = harness.model_index_results(downstream)
    assert [(e["task_type"], e["metric_type"], e["metric_value"]) for e in entries] == [
        ("multiple-choice", "acc", 0.4),
        ("translation", "chrf", 31.2),
    ]
    assert _check_eval_results({"after": {"de": 30.0}, "downstream": downstream})["downstream"] == downstream
    with pytest.raises(ValueError, match="finite"):
        _check_eval_results({"downstream": {"mwanda_continuation_de": {"acc": float("nan")}}})


def test_missing_lm_eval_is_reported(monkeypatch, tiny):
    monkeypatch.setattr(harness, "lm_eval_available", lambda: False)
    with pytest.raises(ImportError, match=r"optimum-mwanda\[eval\]"):
        harness.run_downstream(*tiny, "mwanda_continuation", limit=1)


def test_model_card_records_downstream_results_next_to_perplexity():
    from hub_fixtures import make_report, prune_by_magnitude, tiny_llama
    from huggingface_hub import ModelCard

    from optimum_mwanda.hub import create_model_card

    model = tiny_llama(seed=3, layers=2)
    prune_by_magnitude(model, [0.5, 0.5])
    evals = {
        "after": {"de": 25.5},
        "downstream": {
            "mwanda_continuation_de": {"acc": 0.4, "acc_norm": 0.45},
            "mwanda_translation_en-de": {"chrf": 31.2},
        },
    }
    card = ModelCard(str(create_model_card(make_report(model, ["de"]), eval_results=evals)))
    results = {(r.metric_type, r.dataset_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("perplexity", "held-out-text"): 25.5,
        ("acc", "mwanda_continuation_de"): 0.4,
        ("acc_norm", "mwanda_continuation_de"): 0.45,
        ("chrf", "mwanda_translation_en-de"): 31.2,
    }
    assert "| `mwanda_translation_en-de` | chrf 31.2 |" in card.text


def test_cli_eval_runs_bundled_tasks(tmp_path, capsys):
    from optimum_mwanda.cli import main

    folder = tmp_path / "tiny"
    make_model("llama", seed=5).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    argv = ["eval", str(folder), "--tasks", "mwanda_continuation", "--languages", "sw", "--limit", "2"]
    code = main([*argv, "--no-perplexity", "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(out)
    assert payload["downstream"]["samples"] == {"mwanda_continuation_sw": 2}
    assert 0 <= payload["downstream"]["by_language"]["sw"]["continuation_acc"] <= 1
    assert main(["eval", str(folder), "--tasks", "mwanda_translation", "--languages", "sw", "-q"]) == 2
    assert "no subtask" in capsys.readouterr().err
