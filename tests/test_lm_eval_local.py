"""lm-eval's own tasks on local data (``run_downstream(..., task_data=...)``), offline, on a tiny model.

The data is XCOPA's validation split from ``../shared/benchmarks/xcopa/`` next to the repository (the CI
layout). The checks that matter: the requests lm-eval sends to the model through our path are exactly the
ones lm-eval's own, unmodified task object builds on the same documents (its prompts), and the reported
numbers are lm-eval's aggregation of its own per-document metric.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import make_model, make_tokenizer

pytest.importorskip("lm_eval")
pytest.importorskip("sacrebleu")

from optimum_mwanda.evaluation import harness  # noqa: E402
from optimum_mwanda.evaluation.local_data import (  # noqa: E402
    MissingTaskData,
    candidate_locations,
    local_task_manager,
)

REPO = Path(__file__).resolve().parent.parent


def _shared_xcopa() -> Path | None:
    """``../shared/benchmarks/xcopa`` next to the repository, or next to the main checkout of a worktree."""
    bases = [REPO.parent]
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        bases.append(Path(common).parent.parent)
    except (OSError, subprocess.CalledProcessError):
        pass
    for base in bases:
        folder = base / "shared" / "benchmarks" / "xcopa"
        if (folder / "val.et.jsonl").is_file():
            return folder
    return None


XCOPA = _shared_xcopa()
needs_xcopa = pytest.mark.skipif(
    XCOPA is None, reason=f"XCOPA data not found at {REPO.parent / 'shared/benchmarks/xcopa'} (CI's layout)"
)
LIMIT = 6


@pytest.fixture(scope="module")
def tiny():
    return make_model("llama", seed=3), make_tokenizer()


@pytest.fixture(scope="module")
def xcopa_plan():
    if XCOPA is None:
        pytest.skip("no XCOPA data")
    return harness.prepare_task_data(["xcopa"], XCOPA)


@pytest.fixture(scope="module")
def own_manager():
    """lm-eval's own task index (its YAMLs, unmodified)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _own_task(manager, name: str, lang: str, monkeypatch):
    """lm-eval's own task object, built from its unmodified YAML, with the Hub download answered by the
    local documents (as both its test and validation split): the reference for prompts and requests."""
    import datasets

    local = datasets.load_dataset("json", data_files=str(XCOPA / f"val.{lang}.jsonl"), split="train")
    load = datasets.load_dataset

    def hub(path=None, name=None, **kwargs):
        if path == "cambridgeltl/xcopa":
            assert name == lang
            return datasets.DatasetDict({"test": local, "validation": local})
        return load(path=path, name=name, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    task = manager.load([name])["tasks"][name]
    monkeypatch.setattr(datasets, "load_dataset", load)
    return task


def _requests(task, limit: int) -> list[tuple[str, str]]:
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [tuple(instance.args) for instance in task.instances]


# ---------------------------------------------------------------------------------------------------------
# the plan: which files, which split
# ---------------------------------------------------------------------------------------------------------
@needs_xcopa
def test_the_xcopa_group_maps_to_the_local_validation_files(xcopa_plan):
    assert sorted(xcopa_plan.tasks) == sorted(f"xcopa_{lang}" for lang in _languages())
    assert set(xcopa_plan.groups) == {"xcopa"}
    et = xcopa_plan.tasks["xcopa_et"]
    assert et.files == {"validation": [str((XCOPA / "val.et.jsonl").resolve())]}
    assert et.builder == "json" and et.evaluated_split == "validation"
    assert "test" in et.note and "validation" in et.note  # lm-eval would score test: said, and recorded
    assert et.overrides["test_split"] is None and et.overrides["dataset_name"] is None
    assert et.source_yaml.endswith("lm_eval/tasks/xcopa/default_et.yaml")
    assert json.loads(json.dumps(xcopa_plan.to_dict()))["tasks"]["xcopa_et"]["hub_dataset"].startswith(
        "cambridgeltl/xcopa"
    )


def _languages() -> list[str]:
    return sorted(p.name.split(".")[1] for p in XCOPA.glob("val.*.jsonl"))


@needs_xcopa
def test_a_task_whose_data_is_missing_is_an_error_naming_the_files_expected(tmp_path):
    shutil.copy(XCOPA / "val.et.jsonl", tmp_path / "val.et.jsonl")
    harness.prepare_task_data(["xcopa_et"], tmp_path)  # present: fine
    with pytest.raises(MissingTaskData, match="xcopa_sw") as error:
        harness.prepare_task_data(["xcopa_et", "xcopa_sw"], tmp_path)
    message = str(error.value)
    assert "cambridgeltl/xcopa" in message
    assert f"{tmp_path}/{{test,validation,val,dev}}.sw.{{jsonl,json,parquet,csv}}" in message
    assert f"{tmp_path}/sw/{{test,validation,val,dev}}" in message
    with pytest.raises(MissingTaskData, match="no local data for 10 of 11"):  # the group needs every language
        harness.prepare_task_data(["xcopa"], tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        harness.prepare_task_data(["xcopa_et"], tmp_path / "nowhere")
    with pytest.raises(ValueError, match="knows no task"):
        harness.prepare_task_data(["xcopa_xx"], tmp_path)


@needs_xcopa
def test_the_test_split_is_preferred_when_present_and_layouts_and_formats_are_found(tmp_path):
    import datasets

    docs = datasets.load_dataset("json", data_files=str(XCOPA / "val.et.jsonl"), split="train")
    (tmp_path / "xcopa" / "et").mkdir(parents=True)
    docs.select(range(10)).to_json(tmp_path / "xcopa" / "et" / "test.jsonl")
    docs.to_parquet(tmp_path / "xcopa" / "et" / "validation.parquet")
    plan = harness.prepare_task_data(["xcopa_et"], tmp_path)
    task = plan.tasks["xcopa_et"]
    assert task.evaluated_split == "test" and task.note is None
    assert task.builder == "json" and list(task.files) == ["test"]  # 0-shot: validation is not read
    assert task.overrides["validation_split"] is None and "test_split" not in task.overrides
    # 1-shot: lm-eval draws XCOPA's demonstrations from validation, so it is read too: one builder for both.
    with pytest.raises(ValueError, match="mix formats"):
        harness.prepare_task_data(["xcopa_et"], tmp_path, num_fewshot=1)
    docs.to_json(tmp_path / "xcopa" / "et" / "validation.jsonl")
    (tmp_path / "xcopa" / "et" / "validation.parquet").unlink()
    task = harness.prepare_task_data(["xcopa_et"], tmp_path, num_fewshot=1).tasks["xcopa_et"]
    assert sorted(task.files) == ["test", "validation"] and task.evaluated_split == "test"

    saved = tmp_path / "saved"
    datasets.DatasetDict({"validation": docs}).save_to_disk(str(saved / "sw"))
    plan = harness.prepare_task_data(["xcopa_sw"], saved)
    assert (
        plan.tasks["xcopa_sw"].builder == "arrow" and plan.tasks["xcopa_sw"].evaluated_split == "validation"
    )

    # Two copies of one split: refused, both named.
    twice = tmp_path / "twice"
    (twice / "et").mkdir(parents=True)
    shutil.copy(XCOPA / "val.et.jsonl", twice / "val.et.jsonl")
    shutil.copy(XCOPA / "val.et.jsonl", twice / "et" / "validation.jsonl")
    with pytest.raises(ValueError, match="several local copies"):
        harness.prepare_task_data(["xcopa_et"], twice)


# The table of docs/evaluation.md: task -> (example local file, split scored, demonstration split).
DOCUMENTED = {
    "xcopa_et": ("xcopa/et/test.jsonl", "test", "validation"),
    "xstorycloze_sw": ("xstory_cloze/sw/eval.jsonl", "eval", "train"),
    "xwinograd_zh": ("xwinograd/zh/test.jsonl", "test", "test"),
    "belebele_swh_Latn": ("belebele/swh_Latn/test.parquet", "test", "test"),
    "xnli_sw": ("xnli/sw/validation.jsonl", "validation", "train"),
    "paws_de": ("paws-x/de/test.jsonl", "test", "train"),
    "arc_de": ("m_arc/de/test.jsonl", "test", "train"),
    "hellaswag_de": ("m_hellaswag/de/val.jsonl", "val", "val"),
    "m_mmlu_de": ("m_mmlu/de/test.jsonl", "test", "train"),
}


def test_the_documented_mapping_of_the_common_multilingual_tasks(tmp_path):
    for path, _, _ in DOCUMENTED.values():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")  # planning reads no content
    plan = harness.prepare_task_data(list(DOCUMENTED), tmp_path)
    for name, (path, split, _) in DOCUMENTED.items():
        task = plan.tasks[name]
        assert task.files == {split: [str((tmp_path / path).resolve())]}, name
        assert task.evaluated_split == split and task.note is None, name
    # With demonstrations, each task needs its documented demonstration split (here: missing where it differs).
    for name, (path, split, demos) in DOCUMENTED.items():
        if demos == split:
            assert harness.prepare_task_data([name], tmp_path, num_fewshot=1).tasks[name].files == {
                split: [str((tmp_path / path).resolve())]
            }
        else:
            with pytest.raises(MissingTaskData, match=f"demonstrations from split '{demos}'"):
                harness.prepare_task_data([name], tmp_path, num_fewshot=1)


def test_candidate_locations_cover_the_documented_layouts(tmp_path):
    found = candidate_locations(tmp_path, "xcopa_et", "cambridgeltl/xcopa", "et", "validation")
    rel = {str(p.relative_to(tmp_path)) for p in found}
    assert {"xcopa_et/validation", "xcopa/et/validation", "et/validation", "val.et", "et.validation"} <= rel
    found = candidate_locations(tmp_path, "lambada_openai", "EleutherAI/lambada_openai", None, "test")
    assert {"lambada_openai/test", "test"} <= {str(p.relative_to(tmp_path)) for p in found}


# ---------------------------------------------------------------------------------------------------------
# lm-eval's prompts and metrics
# ---------------------------------------------------------------------------------------------------------
@needs_xcopa
@pytest.mark.parametrize("lang", ["et", "zh"])
def test_requests_through_local_data_equal_lm_evals_own_task(
    lang, xcopa_plan, own_manager, tmp_path, monkeypatch
):
    name = f"xcopa_{lang}"
    manager = local_task_manager(xcopa_plan, tmp_path / "overrides")
    ours = manager.load([name])["tasks"][name]
    own = _own_task(own_manager, name, lang, monkeypatch)
    assert _requests(ours, LIMIT) == _requests(own, LIMIT)
    assert len(ours.instances) == 2 * LIMIT  # two choices per item
    # Its own prompt: the premise without its full stop and the language's connective (lm-eval's utils).
    doc = ours.eval_docs[0]
    connective = {"et": {"cause": "sest", "effect": "seetõttu"}, "zh": {"cause": "因为", "effect": "所以"}}
    assert ours.doc_to_text(doc) == doc["premise"].strip()[:-1] + " " + connective[lang][doc["question"]]
    assert [m["metric"] for m in ours.config.metric_list] == ["acc"]


@needs_xcopa
def test_run_downstream_on_local_xcopa_reports_lm_evals_aggregation(
    tiny, xcopa_plan, own_manager, monkeypatch
):
    from lm_eval.api import metrics as lm_metrics
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny
    sent: list[tuple[str, str]] = []
    loglikelihood = HFLM.loglikelihood

    def spy(self, requests, *args, **kwargs):
        sent.extend(tuple(r.args) for r in requests)
        return loglikelihood(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "loglikelihood", spy)
    result = harness.run_downstream(
        model,
        tokenizer,
        ["xcopa_et", "xcopa_sw"],
        task_data=XCOPA,
        limit=LIMIT,
        keep_documents=True,
        show_progress=False,
        max_length=1024,
    )
    monkeypatch.undo()
    own = [
        request
        for lang in ("et", "sw")
        for request in _requests(_own_task(own_manager, f"xcopa_{lang}", lang, monkeypatch), LIMIT)
    ]
    assert sorted(sent) == sorted(own)  # the model saw exactly lm-eval's own requests

    assert result.samples == {"xcopa_et": LIMIT, "xcopa_sw": LIMIT}
    for task in ("xcopa_et", "xcopa_sw"):
        assert set(result.tasks[task]) == {"acc", "acc_stderr"}
        per_doc = [d["acc"] for d in result.documents[task]]
        assert len(per_doc) == LIMIT and set(per_doc) <= {0.0, 1.0}
        assert result.tasks[task]["acc"] == pytest.approx(lm_metrics.mean(per_doc))
        assert result.tasks[task]["acc_stderr"] == pytest.approx(lm_metrics.mean_stderr(per_doc))
    assert result.settings["task_data"]["tasks"]["xcopa_et"]["evaluated_split"] == "validation"
    # The standard errors are printed and kept for the card.
    table = result.format_table()
    assert "xcopa_et" in table and "stderr" in table
    assert f"{result.tasks['xcopa_et']['acc_stderr']:.4f}" in table
    assert result.eval_results()["xcopa_et"]["acc_stderr"] == result.tasks["xcopa_et"]["acc_stderr"]
    again = harness.DownstreamResult.from_dict(json.loads(result.to_json()))
    assert again.tasks == result.tasks and again.documents == result.documents


@needs_xcopa
def test_the_group_is_aggregated_by_lm_eval(tiny, xcopa_plan):
    from lm_eval.api import metrics as lm_metrics

    model, tokenizer = tiny
    result = harness.run_downstream(
        model, tokenizer, "xcopa", task_data=xcopa_plan, limit=2, show_progress=False, max_length=1024
    )
    languages = _languages()
    subtasks = [f"xcopa_{lang}" for lang in languages]
    assert set(result.tasks) == {"xcopa", *subtasks}
    assert result.settings["group_tasks"]["xcopa"] == subtasks
    accs = [result.tasks[t]["acc"] for t in subtasks]
    sizes = [result.samples[t] for t in subtasks]
    assert result.tasks["xcopa"]["acc"] == pytest.approx(lm_metrics.aggregate_subtask_metrics(accs, sizes))
    stderrs = [result.tasks[t]["acc_stderr"] for t in subtasks]
    assert result.tasks["xcopa"]["acc_stderr"] == pytest.approx(
        lm_metrics.pooled_sample_stderr(stderrs, sizes)
    )
    assert "xcopa " in result.format_table() and str(sum(sizes)) in result.format_table()


# ---------------------------------------------------------------------------------------------------------
# standard errors of the bundled tasks
# ---------------------------------------------------------------------------------------------------------
def test_standard_errors_are_shown_and_kept():
    result = harness.DownstreamResult(
        {
            "mwanda_continuation_de": {
                "acc": 0.4,
                "acc_stderr": 0.1,
                "acc_norm": 0.5,
                "acc_norm_stderr": 0.1,
            },
            "mwanda_continuation_sw": {"acc": 0.2, "acc_stderr": 0.08, "acc_norm": 0.3},
            "mwanda_translation_en-de": {"chrf": 31.2, "chrf_stderr": float("nan")},
            "xnli_de": {"acc": 0.41, "acc_stderr": 0.012, "acc (strict)": 0.3, "acc_stderr (strict)": 0.02},
        },
        {"mwanda_continuation_de": 30, "mwanda_continuation_sw": 30, "xnli_de": 2490},
    )
    assert result.by_language["de"]["continuation_acc_stderr"] == 0.1
    assert "continuation_acc_norm_stderr" not in result.by_language["sw"]
    assert "chrf_en_xx_stderr" not in result.by_language["de"]  # "N/A"/nan stderrs are not shown
    errors = result.mean_stderrs()
    assert errors["continuation_acc"] == pytest.approx(math.sqrt(0.1**2 + 0.08**2) / 2)
    assert "continuation_acc_norm" not in errors  # one language lacks it
    table = result.format_table()
    assert "0.400 ± 0.100" in table and "0.200 ± 0.080" in table  # per language
    assert f"0.300 ± {errors['continuation_acc']:.3f}" in table  # the mean of 0.4 and 0.2, with its stderr
    rows = {line.split()[-4]: line.split()[-3:] for line in table.splitlines() if "2490" in line}
    assert rows == {"acc": ["0.4100", "0.0120", "2490"], "(strict)": ["0.3000", "0.0200", "2490"]}
    kept = result.eval_results()
    assert kept["mwanda_continuation_de"]["acc_stderr"] == 0.1
    assert kept["xnli_de"]["acc_stderr (strict)"] == 0.02
    assert "chrf_stderr" not in kept["mwanda_translation_en-de"]
    assert json.loads(result.to_json())["mean_stderrs"]["continuation_acc"] == pytest.approx(
        errors["continuation_acc"]
    )


# ---------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------
@needs_xcopa
def test_cli_eval_runs_lm_eval_tasks_on_local_data(tmp_path, capsys):
    from optimum_mwanda.cli import main

    torch.manual_seed(0)
    folder = tmp_path / "tiny"
    make_model("llama", seed=5).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    argv = ["eval", str(folder), "--tasks", "xcopa_et,xcopa_sw", "--task-data", str(XCOPA), "--limit", "2"]
    code = main([*argv, "--no-perplexity", "--json", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(out)["downstream"]
    assert payload["samples"] == {"xcopa_et": 2, "xcopa_sw": 2}
    assert set(payload["tasks"]["xcopa_et"]) == {"acc", "acc_stderr"}
    assert payload["settings"]["task_data"]["tasks"]["xcopa_sw"]["evaluated_split"] == "validation"

    assert main([*argv, "--no-perplexity", "-q"]) == 0
    out = capsys.readouterr().out
    assert "xcopa_et" in out and "stderr" in out

    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["eval", str(folder), "--tasks", "xcopa_et", "--task-data", str(empty)]
    assert main([*argv, "--no-perplexity", "-q"]) == 2
    err = capsys.readouterr().err
    assert "xcopa_et" in err and "{test,validation,val,dev}.et" in err


@needs_xcopa
def test_example_runs_lm_eval_tasks_on_local_data(tmp_path, capsys):
    from repo_scripts import load_script

    example = load_script("examples/evaluate_pruned.py", "example_evaluate_pruned_local")
    folder = tmp_path / "tiny"
    make_model("llama", seed=5).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    argv = [str(folder), "--languages", "en", "--seq-len", "32", "--max-windows", "1", "--tasks", "xcopa_sw"]
    out = example.main([*argv, "--task-data", str(XCOPA), "--task-limit", "2"])
    downstream = out["models"]["tiny"]["downstream"]
    assert downstream["samples"] == {"xcopa_sw": 2} and "acc_stderr" in downstream["tasks"]["xcopa_sw"]
    assert "stderr" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        example.main(["/nonexistent/model", "--tasks", "xcopa_sw", "--task-data", str(empty)])
    assert exit_info.value.code == 2  # before the (nonexistent) model is loaded
    assert "xcopa_sw" in capsys.readouterr().err
