"""The command line: `optimum-mwanda prune|eval|sweep|card` and the `optimum-cli` plugin (tiny models, offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import READ_TOKEN, WRITE_TOKEN
from huggingface_hub import ModelCard
from permissions import unwritable
from tiny_models import make_model, make_tokenizer, text_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_mwanda import (
    Pruner,
    WandaConfig,
    build_calibration,
    evaluate_perplexity,
    load_pruned_model,
    verify_sparsity,
)
from optimum_mwanda.calibration import HUB_CORPORA, load_local_texts
from optimum_mwanda.cli import arguments, commands, main
from optimum_mwanda.configuration import _CONFIG_CLASSES, LAYERWISE_SCHEDULES

SMALL = ["--samples-per-language", "2", "--seq-len", "16"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny Llama with its tokenizer, plus calibration and held-out text files by language."""
    root = tmp_path_factory.mktemp("cli")
    model_dir, data, heldout = root / "tiny-llama", root / "data", root / "heldout"
    make_model("llama", seed=5).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    data.mkdir()
    heldout.mkdir()
    for lang, texts in text_corpus().items():
        (data / f"{lang}.txt").write_text("\n".join(texts[:40]) + "\n", encoding="utf-8")
        (heldout / f"{lang}.txt").write_text("\n".join(texts[40:]) + "\n", encoding="utf-8")
    return {"root": root, "model": model_dir, "data": data, "heldout": heldout}


def run(capsys, *argv) -> tuple[int, str, str]:
    """Run the CLI in-process; argparse's own errors come back as their exit code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _prune(capsys, workspace, output, *extra):
    return run(
        capsys, "prune", "--model", workspace["model"], "--data", workspace["data"], *SMALL,
        "--output-dir", output, "--json", "-q", *extra,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------------------------
def test_prune_writes_a_checkpoint_identical_to_the_python_api(capsys, workspace, tmp_path):
    out = tmp_path / "pruned"
    # No --quiet: the progress bars must go to stderr, leaving stdout to the JSON document.
    code, stdout, stderr = run(
        capsys, "prune", "--model", workspace["model"], "--data", workspace["data"], "--languages", "en,sw",
        "--method", "wanda", *SMALL, "--output-dir", out, "--json",
    )  # fmt: skip
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert "Pruning (wanda)" in stderr
    report = payload["report"]
    assert payload["output_dir"] == str(out.absolute()) and payload["hub"] is None
    assert report["method"] == "wanda" and report["languages"] == ["en", "sw"]
    assert report["config"]["samples_per_language"] == 2 and report["config"]["calibration_seq_len"] == 16
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert set(report["calibration_sources"]) == {"en", "sw"}

    # Plain transformers reloads it with the zeros and the sparsity_config.
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.sparsity_config["method"] == "wanda"
    assert saved.config.sparsity_config["calibration_languages"] == ["en", "sw"]
    check = verify_sparsity(saved)
    assert check.module_sparsity == pytest.approx(report["module_sparsity"])
    assert {"README.md", "pruning_report.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}

    # The same run through the Python API gives exactly the same weights.
    tokenizer = AutoTokenizer.from_pretrained(workspace["model"])
    model = AutoModelForCausalLM.from_pretrained(workspace["model"])
    texts = load_local_texts([workspace["data"]], languages=["en", "sw"])
    calibration = build_calibration(texts, tokenizer, samples_per_language=2, seq_len=16, seed=0)
    Pruner(WandaConfig(samples_per_language=2, calibration_seq_len=16)).prune_model(
        model, calibration, show_progress=False
    )
    expected, got = model.state_dict(), saved.state_dict()
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_config_file_with_flag_overrides(capsys, workspace, tmp_path):
    config = tmp_path / "prune.yaml"
    config.write_text(
        "method: mwanda\nsparsity: 0.6\nvariance_weight: 0.25\nsamples_per_language: 3\n"
        "calibration_seq_len: 16\nignore: ['*.mlp.down_proj']\n",
        encoding="utf-8",
    )
    out = tmp_path / "from-yaml"
    code, stdout, stderr = run(
        capsys, "prune", "--model", workspace["model"], "--data", workspace["data"], "--config", config,
        "--sparsity", "0.4", "--samples-per-language", "2", "--output-dir", out, "--json", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    config_used = json.loads(stdout)["report"]["config"]
    assert config_used["method"] == "mwanda" and config_used["variance_weight"] == 0.25  # from the file
    assert config_used["sparsity"] == 0.4 and config_used["samples_per_language"] == 2  # flags win
    assert config_used["ignore"] == ["*.mlp.down_proj"]
    saved = AutoModelForCausalLM.from_pretrained(out)
    assert saved.config.sparsity_config["target_sparsity"] == 0.4
    assert torch.count_nonzero(saved.model.layers[0].mlp.down_proj.weight == 0) == 0  # ignored: still dense

    # A JSON config written by PruningConfig.to_json_file round-trips too.
    json_config = tmp_path / "wanda.json"
    WandaConfig(sparsity=0.3, samples_per_language=2, calibration_seq_len=16).to_json_file(json_config)
    code, stdout, stderr = _prune(capsys, workspace, tmp_path / "from-json", "--config", json_config)
    assert code == 0, stderr
    assert json.loads(stdout)["report"]["method"] == "wanda"
    assert json.loads(stdout)["report"]["target_sparsity"] == 0.3


def test_nm_structure_sets_the_sparsity_and_saves_compressed(capsys, workspace, tmp_path):
    out = tmp_path / "one-of-four"
    code, stdout, stderr = _prune(
        capsys, workspace, out, "--method", "sparsegpt", "--mask-structure", "1:4", "--compressed",
        "--dtype", "float32", "--device-map", "cpu", "--trust-remote-code",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["report"]["target_sparsity"] == 0.75  # 1 - N/M, no --sparsity needed
    assert (out / "model.sparse.safetensors").is_file() and not (out / "model.safetensors").exists()
    check = verify_sparsity(load_pruned_model(out), mask_structure="1:4")
    assert check.nm_ok and check.overall == pytest.approx(0.75)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail loudly if a command loads a model: usage errors must be found before that."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(commands, "_load_model", forbidden)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.5"], "argument --sparsity: expected a number in [0, 1)"),
        (["--method", "obs"], "argument --method: invalid choice"),
        (["--languages", "en,english"], "--languages: 'english' is not a language tag"),
        (["--languages", "en,fr"], "['fr']"),
        (
            ["--mask-structure", "1:4", "--sparsity", "0.5"],
            "set sparsity=0.75 [flags: --sparsity, --mask-structure]",
        ),
        (["--mask-structure", "4:2"], "from the flags: mask_structure='4:2' is impossible"),
        (["--method", "wanda", "--layerwise", "cwl"], "layerwise='cwl' is not available for WandaConfig"),
        (["--seq-len", "4096"], "lower --samples-per-language or --seq-len"),
        (["--push-to-hub", "not a repo"], "--push-to-hub: invalid repo_id 'not a repo'"),
        (["--push-to-hub", "alice/model"], "--push-to-hub needs a Hub token"),
        (["--max-memory", "0=20GiB"], "--max-memory needs --device-map"),
        (
            ["--device-map", "auto", "--max-memory", "gpu0=lots"],
            "--max-memory entry 'gpu0=lots' is malformed",
        ),
        (["--eval", "--eval-languages", "en,yo"], "the bundled held-out corpus has no text for 'yo'"),
        (["--private"], "--private only applies with --push-to-hub"),
        (["--hub-dataset", "mc4"], "argument --hub-dataset: not allowed with argument --data"),
    ],
)
def test_invalid_input_exits_2_before_loading_or_writing(
    capsys, workspace, tmp_path, no_model_loading, extra, message
):
    out = tmp_path / "never-created"
    code, stdout, stderr = _prune(capsys, workspace, out, *extra)
    assert code == 2
    assert message in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not out.exists()


def test_invalid_destinations_and_configs_exit_2(capsys, workspace, tmp_path, no_model_loading):
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8")
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"sparsity": 0.5, "variance_weight": 1.0}', encoding="utf-8")
    broken = tmp_path / "broken.yaml"
    broken.write_text("sparsity: [0.5\n", encoding="utf-8")
    base = ["prune", "--model", workspace["model"], "--data", workspace["data"], "-q"]
    cases = [
        (base + ["--output-dir", unrelated], "holds files but no saved model"),
        (base + ["--output-dir", workspace["model"]], "is the folder of the model being pruned"),
        (base, "pass --output-dir DIR and/or --push-to-hub REPO_ID"),
        (base + ["--output-dir", tmp_path / "o", "--method", "wanda", "--config", bad_config], "unknown WandaConfig fields: ['variance_weight']"),
        (base + ["--output-dir", tmp_path / "o", "--config", broken], "is not valid YAML"),
        (base + ["--output-dir", tmp_path / "o", "--config", tmp_path / "missing.json"], "no such file"),
        (["prune", "--model", tmp_path / "nowhere" / "model", "--output-dir", tmp_path / "o"], "neither an existing folder nor a valid Hub model id"),
        (["prune", "--model", workspace["data"], "--output-dir", tmp_path / "o"], "has no config.json"),
        (["prune", "--model", workspace["model"], "--hub-dataset", "mc4", "--output-dir", tmp_path / "o"], "--hub-dataset needs --languages"),
        (base + ["--output-dir", tmp_path / "o", "--eval", "--eval-data", tmp_path / "nope"], "--eval-data: no such file or folder"),
    ]  # fmt: skip
    for argv, message in cases:
        code, stdout, stderr = run(capsys, *argv)
        assert code == 2, (argv, stderr)
        assert message in stderr, (argv, stderr)
        assert "Traceback" not in stderr
    assert [p.name for p in unrelated.iterdir()] == ["cat.jpg"] and not (tmp_path / "o").exists()


def test_a_failure_while_running_exits_1_without_a_traceback(capsys, workspace, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for item in workspace["model"].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys, "prune", "--model", broken, "--data", workspace["data"], *SMALL, "--output-dir", out, "-q"
    )
    assert code == 1
    assert "optimum-mwanda prune: failed:" in stderr and "--verbose" in stderr
    assert "Traceback" not in stderr and not out.exists()


def test_prune_evaluates_and_pushes_to_the_hub(capsys, workspace, tmp_path, hub):
    code, stdout, stderr = run(
        capsys, "prune", "--model", workspace["model"], "--data", workspace["data"], "--languages", "en,de",
        *SMALL, "--eval", "--eval-data", workspace["heldout"], "--eval-seq-len", "32", "--eval-max-windows", "2",
        "--push-to-hub", "alice/tiny-cli", "--private", "--token", WRITE_TOKEN, "--json", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert payload["output_dir"] is None and payload["hub"]["repo_id"] == "alice/tiny-cli"
    evals = payload["eval_results"]
    assert set(evals["before"]) == set(evals["after"]) == {"en", "de"}
    assert all(evals["after"][lang] != evals["before"][lang] for lang in ("en", "de"))
    assert hub.repos["alice/tiny-cli"].private
    files = hub.files("alice/tiny-cli")
    assert {"README.md", "config.json", "model.safetensors", "pruning_report.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert {r.dataset_config: r.metric_value for r in card.data.eval_results} == pytest.approx(
        {lang: round(value, 4) for lang, value in evals["after"].items()}
    )


def test_hub_dataset_calibration(capsys, workspace, tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kwargs):
        calls.append((path, name, split, streaming))
        lang = {"deu_Latn": "de", "swh_Latn": "sw"}[name]
        return iter([{"text": text} for text in text_corpus()[lang]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    code, stdout, stderr = run(
        capsys, "prune", "--model", workspace["model"], "--hub-dataset", "fineweb2", "--languages", "de,sw",
        *SMALL, "--output-dir", tmp_path / "out", "--json", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    assert calls == [
        ("HuggingFaceFW/fineweb-2", "deu_Latn", "train", True),
        ("HuggingFaceFW/fineweb-2", "swh_Latn", "train", True),
    ]
    report = json.loads(stdout)["report"]
    assert report["calibration_sources"] == {"de": "HuggingFaceFW/fineweb-2", "sw": "HuggingFaceFW/fineweb-2"}


# ---------------------------------------------------------------------------------------------------------
# eval, card, sweep
# ---------------------------------------------------------------------------------------------------------
def test_eval_matches_the_python_api(capsys, workspace):
    code, stdout, stderr = run(
        capsys, "eval", workspace["model"], "--data", workspace["heldout"], "--languages", "en,de",
        "--seq-len", "32", "--max-windows", "3", "--json", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    payload = json.loads(stdout)
    model = AutoModelForCausalLM.from_pretrained(workspace["model"])
    tokenizer = AutoTokenizer.from_pretrained(workspace["model"])
    texts = load_local_texts([workspace["heldout"]], languages=["en", "de"])
    expected = evaluate_perplexity(model, tokenizer, texts, seq_len=32, max_windows=3, show_progress=False)
    assert payload["perplexities"] == pytest.approx(expected, rel=1e-5)
    assert payload["languages"]["en"]["windows"] == 3 and payload["sparsity"] is None

    code, stdout, stderr = run(capsys, "eval", workspace["model"], "--languages", "en,xx", "-q")
    assert code == 2 and "'xx'" in stderr and "Traceback" not in stderr


def test_card_regenerates_from_the_saved_report(capsys, workspace, tmp_path):
    out = tmp_path / "pruned"
    assert _prune(capsys, workspace, out, "--method", "wanda", "--languages", "en,sw")[0] == 0
    (out / "README.md").unlink()
    (out / "sparsity_per_layer.png").unlink()
    results = tmp_path / "evals.json"
    results.write_text(json.dumps({"before": {"en": 10.0, "sw": 20.0}, "after": {"en": 12.5, "sw": 26.0}}))

    code, stdout, stderr = run(
        capsys,
        "card",
        out,
        "--eval-results",
        results,
        "--base-model",
        "acme/tiny-llama",
        "--license",
        "mit",
        "--json",
    )
    assert code == 0, stderr
    assert json.loads(stdout)["card"] == str(out.absolute() / "README.md")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "acme/tiny-llama" and card.data.license == "mit"
    assert card.data.language == ["en", "sw"] and "wanda" in card.data.tags
    assert {r.dataset_config: r.metric_value for r in card.data.eval_results} == {"en": 12.5, "sw": 26.0}
    assert (out / "sparsity_per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "eval_results.json").read_text())["after"] == {"en": 12.5, "sw": 26.0}

    # Rebuilding again keeps the saved results and the previous card's base model and licence.
    code, _, stderr = run(capsys, "card", out, "-q")
    assert code == 0, stderr
    again = ModelCard.load(out / "README.md")
    assert again.data.base_model == "acme/tiny-llama" and again.data.license == "mit"
    assert {r.dataset_config: r.metric_value for r in again.data.eval_results} == {"en": 12.5, "sw": 26.0}

    code, _, stderr = run(capsys, "card", workspace["model"], "-q")
    assert code == 2 and "lacks pruning_report.json" in stderr


def test_sweep_writes_matrix_and_heatmap(capsys, workspace, tmp_path):
    out = tmp_path / "sweep"
    code, stdout, stderr = run(
        capsys, "sweep", workspace["model"], "--method", "wanda", "--data", workspace["data"],
        "--eval-data", workspace["heldout"], "--languages", "en,de", "--eval-languages", "en,sw",
        "--mix", "both=en+de", *SMALL, "--eval-seq-len", "32", "--max-windows", "2", "-o", out, "--json", "-q",
    )  # fmt: skip
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert list(payload["rows"]) == ["en", "de", "both"] and payload["row_languages"]["both"] == ["en", "de"]
    assert payload["eval_languages"] == ["en", "sw"] and set(payload["dense"]) == {"en", "sw"}
    assert json.loads((out / "sweep.json").read_text())["rows"] == payload["rows"]
    assert (out / "sweep_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| both (en+de) |" in (out / "sweep.md").read_text()
    # Different calibration languages give different pruned models, hence different perplexities.
    assert payload["rows"]["en"] != payload["rows"]["de"]

    code, _, stderr = run(capsys, "sweep", workspace["model"], "-o", tmp_path / "s2", "-q")
    assert code == 2 and "--languages" in stderr and not (tmp_path / "s2").exists()


# ---------------------------------------------------------------------------------------------------------
# optimum-cli plugin
# ---------------------------------------------------------------------------------------------------------
def test_arguments_mirror_the_library():
    # arguments.py cannot import the library (it must stay light), so its choices are checked here.
    assert set(arguments.METHODS) == set(_CONFIG_CLASSES)
    assert set(arguments.LAYERWISE) == set(LAYERWISE_SCHEDULES)
    assert set(arguments.HUB_DATASETS.values()) == set(HUB_CORPORA)


def _python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Outside the repository and without PYTHONPATH: only the installed package can be found.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


OPTIMUM_CLI = "import sys; sys.argv[0] = 'optimum-cli'; from optimum.commands.optimum_cli import main; main()"


def test_optimum_cli_discovers_the_plugin(tmp_path, workspace):
    discovery = _python(
        "import json, sys\n"
        "from optimum.commands.optimum_cli import load_optimum_namespace_cli_commands\n"
        "found = [command.COMMAND.name for command, parent in load_optimum_namespace_cli_commands()]\n"
        "print(json.dumps({'found': found, 'heavy': [m for m in ('torch', 'optimum_mwanda') if m in sys.modules]}))",
        cwd=tmp_path,
    )
    assert discovery.returncode == 0, discovery.stderr
    result = json.loads(discovery.stdout)
    assert {"prune", "mwanda"} <= set(result["found"])
    assert result["heavy"] == []  # registering must not import torch or the package

    top = _python(OPTIMUM_CLI, "--help", cwd=tmp_path)
    assert top.returncode == 0 and "prune" in top.stdout and "mwanda" in top.stdout
    prune_help = _python(OPTIMUM_CLI, "prune", "--help", cwd=tmp_path)
    assert prune_help.returncode == 0 and "--push-to-hub REPO_ID" in prune_help.stdout
    sweep_help = _python(OPTIMUM_CLI, "mwanda", "sweep", "--help", cwd=tmp_path)
    assert sweep_help.returncode == 0 and "--mix NAME=LANG+LANG" in sweep_help.stdout

    # The exit code of a command survives optimum-cli (which ignores return values).
    failed = _python(
        OPTIMUM_CLI, "mwanda", "prune", "--model", str(workspace["model"]), "--languages", "en,klingon",
        "--output-dir", str(tmp_path / "out"), cwd=tmp_path,
    )  # fmt: skip
    assert failed.returncode == 2
    assert "optimum-cli mwanda prune: error: --languages: 'klingon' is not a language tag" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_card_keeps_the_evaluation_results_the_save_kept(capsys, workspace, tmp_path):
    out = tmp_path / "pruned"
    code, _, stderr = _prune(
        capsys, workspace, out, "--method", "wanda", "--languages", "en", "de", "--eval",
        "--eval-data", workspace["heldout"], "--eval-seq-len", "32", "--eval-max-windows", "2",
    )  # fmt: skip
    assert code == 0, stderr
    saved = json.loads((out / "eval_results.json").read_text())  # written by save_pretrained itself
    assert set(saved) == {"before", "after"} and set(saved["after"]) == {"en", "de"}
    (out / "notes.md").write_text("mine")
    table = _table_rows(out / "README.md")

    assert run(capsys, "card", out, "-q")[0] == 0
    assert _table_rows(out / "README.md") == table  # nothing dropped
    # Without eval_results.json the card's model-index is read back (the "after" column), with a warning.
    (out / "eval_results.json").unlink()
    code, _, stderr = run(capsys, "card", out)
    assert code == 0, stderr
    card = ModelCard.load(out / "README.md")
    assert {r.dataset_config for r in card.data.eval_results} == {"en", "de"}
    assert "cannot be recovered" in stderr
    assert (out / "notes.md").read_text() == "mine"


def _table_rows(card: Path) -> list[str]:
    return [line for line in card.read_text().splitlines() if line.startswith("| ") and "`" in line]


def test_languages_take_commas_or_spaces_and_eval_has_a_default_budget():
    from optimum_mwanda.cli import build_parser
    from optimum_mwanda.cli.arguments import DEFAULT_EVAL_WINDOWS

    parser = build_parser()
    for argv in (["--languages", "en,de,sw"], ["--languages", "en", "de", "sw"], ["-l", "en,de", "sw"]):
        args = parser.parse_args(["prune", *argv, "--output-dir", "x"])
        assert args.languages == ["en", "de", "sw"], argv
    args = parser.parse_args(["eval", "model-dir", "--languages", "en", "sw"])
    assert args.languages == ["en", "sw"] and args.max_windows == DEFAULT_EVAL_WINDOWS
    assert parser.parse_args(["eval", "m", "--max-windows", "all"]).max_windows is None
    eval_help = " ".join(parser._subparsers._group_actions[0].choices["eval"].format_help().split())
    assert f"default: {DEFAULT_EVAL_WINDOWS}" in eval_help and "'all' scores every window" in eval_help
    prune_help = " ".join(parser._subparsers._group_actions[0].choices["prune"].format_help().split())
    assert "depth for mwanda, uniform for wanda and sparsegpt" in prune_help


def test_eval_reports_the_geometric_mean(capsys, workspace):
    code, stdout, stderr = run(capsys, "eval", workspace["model"], "--data", workspace["heldout"], "--languages", "en", "de", "--seq-len", "32", "--max-windows", "2", "-q")  # fmt: skip
    assert code == 0, stderr
    rows = {line.split()[0]: line.split() for line in stdout.splitlines() if line.strip()}
    mean = float(stdout.splitlines()[-1].split()[-1]) if "geometric mean" in stdout.splitlines()[-1] else None
    en, de = float(rows["en"][-1]), float(rows["de"][-1])
    assert mean == pytest.approx((en * de) ** 0.5, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------
# checks answered before the weights are loaded (config.json, the Hub, folders)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_model(workspace, tmp_path_factory) -> Path:
    """A model folder with config.json (32 positions) and tokenizer but no weights: only the config may be
    read before these runs refuse."""
    folder = tmp_path_factory.mktemp("short") / "short-llama"
    model = make_model("llama")
    model.config.max_position_embeddings = 32
    model.config.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_what_config_json_answers_exits_2_before_loading(
    capsys, workspace, short_model, tmp_path, no_model_loading
):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"hello": "world"}', encoding="utf-8")
    make_tokenizer().save_pretrained(not_a_model)
    out = tmp_path / "o"
    data = ["--data", workspace["data"], "--output-dir", out, "-q"]
    cases = [
        (["--model", short_model, "--seq-len", "64", "--samples-per-language", "1"],
         "--seq-len is 64 tokens but this model takes at most 32 positions: lower --seq-len"),
        (["--model", short_model, *SMALL, "--eval", "--eval-data", workspace["heldout"], "--eval-seq-len", "48"],
         "--eval-seq-len is 48 tokens but this model takes at most 32 positions"),
        (["--model", workspace["model"], *SMALL, "--method", "wanda", "--mask-structure", "3:7"],
         "needs in_features divisible by 7"),
        (["--model", workspace["model"], *SMALL, "--ignore", "*.o_prj"],
         "'*.o_prj' (did you mean '*.o_proj'"),
        (["--model", not_a_model, *SMALL], "its config.json is not a transformers model config"),
    ]  # fmt: skip
    for extra, message in cases:
        code, stdout, stderr = run(capsys, "prune", *data, *extra)
        assert code == 2, (extra, stderr)
        assert message in stderr, (extra, stderr)
        assert "Traceback" not in stderr and stdout == ""
    assert "[flags: --mask-structure]" in run(capsys, "prune", *data, *cases[2][0])[2]
    code, _, stderr = run(capsys, "eval", short_model, "--data", workspace["heldout"], "--seq-len", "64")
    assert code == 2 and "--seq-len is 64 tokens but this model takes at most 32 positions" in stderr
    assert not out.exists()


def test_an_output_dir_in_an_unwritable_folder_exits_2(capsys, workspace, tmp_path, no_model_loading):
    (tmp_path / "read-only" / "out").mkdir(parents=True)
    with unwritable(tmp_path / "read-only") as folder:
        for target in (folder / "out", folder / "new" / "out"):
            code, _, stderr = _prune(capsys, workspace, target)
            assert code == 2 and "no write permission on" in stderr, stderr
        assert [p.name for p in folder.iterdir()] == ["out"] and not any((folder / "out").iterdir())


@pytest.mark.parametrize(
    ("token", "repo_id", "message"),
    [
        ("hf_not_a_real_token", "alice/x", "rejected the token"),
        (READ_TOKEN, "bob/x", "is read-only"),
        (WRITE_TOKEN, "bob/x", "may not create or write repos in the namespace 'bob'"),
    ],
)
def test_a_token_that_cannot_push_exits_2_before_loading(
    capsys, workspace, tmp_path, hub, no_model_loading, token, repo_id, message
):
    code, stdout, stderr = _prune(
        capsys, workspace, tmp_path / "o", "--push-to-hub", repo_id, "--token", token
    )
    assert code == 2 and message in stderr, stderr
    assert [path for _, path, _ in hub.log] == ["/api/whoami-v2"]  # one question, nothing created
    assert not hub.repos and not (tmp_path / "o").exists()


def test_a_failed_push_keeps_the_pruned_model_locally(capsys, workspace, tmp_path, hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub.fail("POST", r"/api/models/.+/commit/main", 400, times=10)
    code, stdout, stderr = run(
        capsys, "prune", "--model", workspace["model"], "--data", workspace["data"], *SMALL,
        "--push-to-hub", "alice/tiny-unpushed", "--token", WRITE_TOKEN, "-q",
    )  # fmt: skip
    assert code == 1, stderr
    kept = tmp_path / "tiny-unpushed"
    assert f"The pruned model is saved in {kept}" in stderr
    assert f"hf upload alice/tiny-unpushed {kept}" in stderr
    assert verify_sparsity(load_pruned_model(kept)).overall == pytest.approx(0.5, abs=0.01)
