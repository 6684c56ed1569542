"""The calibration-language matrix under its own name; "sweep" stays as a deprecated alias."""

from __future__ import annotations

import importlib
import warnings

import pytest


def test_public_names_and_their_deprecated_aliases():
    from optimum_mwanda import evaluation

    assert evaluation.SweepResult is evaluation.LanguageMatrixResult
    assert evaluation.calibration_language_sweep is evaluation.calibration_language_matrix
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import optimum_mwanda.evaluation.sweep as old

        importlib.reload(old)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert old.calibration_language_sweep is evaluation.calibration_language_matrix


@pytest.mark.parametrize("command", ["language-matrix", "sweep"])
def test_cli_takes_the_new_command_and_the_old_name(command, tmp_path):
    from optimum_mwanda.cli.arguments import build_parser

    args = build_parser().parse_args([command, "--languages", "en", "--output-dir", str(tmp_path)])
    assert args.command == command and args.languages == ["en"]
