"""The pure helpers and the command line of examples/prune_and_evaluate.py (no model is loaded)."""

import math

import pytest
from repo_scripts import load_script

example = load_script("examples/prune_and_evaluate.py")


def test_split_heldout_keeps_the_tail_out_of_calibration():
    texts = {"en": [f"e{i}" for i in range(20)], "sw": ["s0", "s1", "s2"]}
    calibration, heldout = example.split_heldout(texts, 0.1)
    assert heldout["en"] == ["e18", "e19"] and calibration["en"] == [f"e{i}" for i in range(18)]
    # At least one text on each side, however small the fraction.
    assert calibration["sw"] == ["s0", "s1"] and heldout["sw"] == ["s2"]
    assert example.split_heldout({"de": ["a", "b"]}, 0.9) == ({"de": ["a"]}, {"de": ["b"]})


@pytest.mark.parametrize(
    "texts, fraction, message", [({"en": ["only"]}, 0.1, "'en' has 1"), ({"en": ["a", "b"]}, 1.0, "fraction")]
)
def test_split_heldout_rejects(texts, fraction, message):
    with pytest.raises(ValueError, match=message):
        example.split_heldout(texts, fraction)


def test_format_table_rows_and_geomean():
    columns = {"dense": {"en": 10.0, "sw": 40.0}, "M-Wanda": {"en": 20.0, "sw": 80.0}}
    table = example.format_table(columns, ["en", "sw"]).splitlines()
    assert table[0].split() == ["language", "dense", "M-Wanda"]
    assert table[2].split() == ["en", "10.00", "20.00"]
    assert table[-1].split() == ["geometric", "mean", "20.00", "40.00"]
    assert math.isnan(example.geometric_mean([1.0, float("nan")]))


def test_command_line_defaults_and_switches():
    args = example.build_parser().parse_args([])
    assert (args.model, args.method, args.sparsity, args.compare, args.data) == (
        "demo",
        "mwanda",
        0.5,
        True,
        None,
    )
    args = example.build_parser().parse_args(
        ["--no-compare", "--method", "sparsegpt", "--languages", "en", "de"]
    )
    assert not args.compare and args.method == "sparsegpt" and args.languages == ["en", "de"]
    with pytest.raises(SystemExit):
        example.build_parser().parse_args(["--method", "magnitude"])
    with pytest.raises(SystemExit, match="sparsity"):
        example.main(["--sparsity", "1.5"])


def _refuse_loading(model_id):
    raise AssertionError(f"the model {model_id!r} was loaded before the arguments were checked")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--languages", "en,jp"], "'jp' is not a language tag"),
        (["--languages", "en", "ko"], "bundled corpus has no text for ko"),
        (["--max-windows", "0"], "--max-windows must be a positive integer"),
        (["--data", "no-such-folder"], "is not a folder"),
        (["--model", "not a model id"], "neither 'demo', an existing folder nor a Hub id"),
    ],
)
def test_main_checks_arguments_before_loading_the_model(monkeypatch, argv, message):
    monkeypatch.setattr(example, "_load", _refuse_loading)
    with pytest.raises(SystemExit, match=message):
        example.main(argv)


def test_check_arguments_canonicalises_languages():
    args = example.build_parser().parse_args(["--languages", "EN,de", "sw", "en"])
    assert example.check_arguments(args) == ["en", "de", "sw"]
    assert example.check_arguments(example.build_parser().parse_args([])) is None


def test_evaluate_pruned_checks_languages_before_loading(monkeypatch):
    evaluate = load_script("examples/evaluate_pruned.py", name="evaluate_pruned_example")
    monkeypatch.setattr(evaluate, "_load", lambda reference, dtype: _refuse_loading(reference))
    with pytest.raises(SystemExit, match="'jp' is not a language tag"):
        evaluate.main(["demo", "--languages", "en,jp"])
