"""The method registry: one entry per method, read by the pruner, the report, the card and the CLI; a fifth
method (magnitude pruning) added here, in the test file itself, runs through all of them."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import ClassVar

import pytest
import torch
from tiny_models import make_model, make_token_calibration

from optimum_mwanda import MWandaConfig, Pruner, PruningConfig, PruningReport, SparseGPTConfig, WandaConfig
from optimum_mwanda.configuration import MWANDA_DEFAULTS, ClosedForm, ColumnSweep, NoUpdate, resolve_config

# -- the fifth method: one "module" (config + algorithm) and one registry line ------------------------------
from optimum_mwanda.methods import MethodEntry, PruningAlgorithm, describe_method, register_method  # noqa: E402
from optimum_mwanda.methods.registry import Description
from optimum_mwanda.parts import FeatureStatistics, mask_from_scores  # noqa: E402


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(PruningConfig):
    """Magnitude pruning: the smallest ``|W_ij|`` of every row."""

    method: ClassVar[str] = "magnitude"


class MagnitudeAlgorithm(PruningAlgorithm):
    config_class = MagnitudeConfig

    def new_statistic(self, in_features, num_languages, device):
        return FeatureStatistics(in_features, num_languages, device=device)

    def mask_score(self):
        return Description("mask score", "magnitude", "|W_ij|, compared within each output row")

    def prune_group(self, name, weights, statistic, negative_statistic, sparsity):
        masks = [mask_from_scores(w.float().abs(), sparsity, self.config.nm_structure) for w in weights]
        return [w.float().masked_fill(m, 0.0) for w, m in zip(weights, masks)]


MAGNITUDE = MethodEntry("magnitude", "Magnitude", "smallest weights", MagnitudeConfig, MagnitudeAlgorithm)
# -- end of the fifth method ---------------------------------------------------------------------------------


@pytest.fixture
def magnitude():
    from optimum_mwanda.methods import unregister_method

    register_method(MAGNITUDE)
    yield MAGNITUDE
    unregister_method("magnitude")


def test_a_fifth_method_runs_through_pruner_report_card_and_cli(magnitude, tmp_path):
    torch.manual_seed(0)
    model = make_model("llama")
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = Pruner(MagnitudeConfig(sparsity=0.5)).prune_model(
        model, make_token_calibration(), show_progress=False
    )
    assert report.method == "magnitude" and abs(report.achieved_sparsity - 0.5) < 0.01
    # The kept weights are the largest of each row, unchanged.
    for name, param in model.named_parameters():
        if name.endswith("q_proj.weight"):
            kept, magnitude = param != 0, dense[name].abs()
            assert torch.equal(param[kept], dense[name][kept])
            largest_pruned = magnitude.masked_fill(kept, 0.0).amax(dim=1)
            assert (largest_pruned <= magnitude.masked_fill(~kept, float("inf")).amin(dim=1)).all()
    # The report round-trips through JSON with the registered config class.
    again = PruningReport.from_dict(json.loads(report.to_json()))
    assert isinstance(again.config, MagnitudeConfig) and again.config == report.config
    assert report.to_dict()["method_description"]["parts"][0]["name"] == "magnitude"
    # The card reads the title and parts from the registry.
    from optimum_mwanda.hub import create_model_card

    text = create_model_card(report).text
    assert "| Method | Magnitude (smallest weights) |" in text
    assert "| Mask score | magnitude |" in text and "| Weight update | none |" in text
    assert "No weight was retrained." in text
    # The CLI offers it.
    from optimum_mwanda.cli.arguments import build_parser

    args = build_parser().parse_args(["prune", "--method", "magnitude", "--output-dir", str(tmp_path)])
    from optimum_mwanda.cli.options import build_config

    assert isinstance(build_config(args), MagnitudeConfig)


def test_unknown_methods_and_duplicate_names_are_refused(magnitude):
    with pytest.raises(ValueError, match="already registered"):
        register_method(MAGNITUDE)
    with pytest.raises(ValueError, match="unknown pruning method 'lottery'"):
        PruningConfig.from_dict({"method": "lottery"})


def test_cli_choices_and_method_flags_come_from_the_registry(tmp_path):
    from optimum_mwanda.cli.arguments import build_parser
    from optimum_mwanda.cli.errors import UsageError
    from optimum_mwanda.cli.options import build_config
    from optimum_mwanda.methods import method_names

    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    method_action = next(a for a in prune._actions if "--method" in a.option_strings)
    assert tuple(method_action.choices) == method_names() == ("wanda", "sparsegpt", "mwanda")
    args = parser.parse_args(["prune", "--method", "sparsegpt", "--block-size", "64", "-o", str(tmp_path)])
    assert build_config(args) == SparseGPTConfig(block_size=64)
    args = parser.parse_args(["prune", "--weight-update", "sweep", "-o", str(tmp_path)])
    assert build_config(args).resolve().weight_update.name == "sweep"
    args = parser.parse_args(["prune", "--method", "wanda", "--block-size", "64", "-o", str(tmp_path)])
    with pytest.raises(UsageError, match="--block-size does not apply to --method wanda"):
        build_config(args)


# -- resolution -----------------------------------------------------------------------------------------
GEMMA = {"calibration_tokens": 7 * 8 * 512, "input_widths": (640, 640, 2048)}  # Gemma 3 270M, defaults
SWEEP = ColumnSweep(128, 0.01, 0.3, 4, "greedy", 5)
CLOSED = ClosedForm(32, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "layerwise", "update"),
    [
        ({"sparsity": 0.5}, "depth", CLOSED),
        ({"sparsity": 0.6}, "depth", CLOSED),
        ({"sparsity": 0.65}, "depth", SWEEP),
        ({"sparsity": 0.8}, "depth", SWEEP),
        ({"sparsity": 0.5, "mask_structure": "2:4"}, "uniform", SWEEP),
        ({"sparsity": 0.5, "mask_structure": "4:8"}, "uniform", SWEEP),
    ],
)
def test_default_configs_resolve_to_the_values_of_the_flat_config(kwargs, layerwise, update):
    """The values the flat MWandaConfig (before the parts) resolved to, captured from that version:
    closed form rank 32 / shrinkage 0.1 below 65%, the sweep (shrinkage 0.3, 5 refinement steps, every 4th
    token at 28672 tokens) from 65% and at N:M; SparseGPT and Wanda unchanged."""
    config = MWandaConfig(**kwargs)
    resolved = resolve_config(config, **GEMMA)
    assert (resolved.layerwise, resolved.weight_update) == (layerwise, update)
    assert config.weight_update is None  # the user's object is not changed
    assert dataclasses.replace(resolved, weight_update=None) == config
    assert resolve_config(resolved, **GEMMA) == resolved  # resolving twice changes nothing
    assert resolve_config(SparseGPTConfig(**kwargs), **GEMMA).weight_update == ColumnSweep(
        128, 0.01, 0.0, 1, "greedy", 0
    )
    assert resolve_config(WandaConfig(**kwargs), **GEMMA) == WandaConfig(**kwargs)
    flat = dataclasses.asdict(update)
    if update is SWEEP:
        assert flat["hessian_token_stride"] == MWANDA_DEFAULTS.max_hessian_token_stride


def test_resolved_config_holds_no_none_and_the_stride_per_width_when_it_differs():
    resolved = MWandaConfig(mask_structure="2:4").resolve(576, [64, 128, 64])
    assert resolved.weight_update.hessian_token_stride == {64: 4, 128: 2}
    assert None not in dataclasses.asdict(resolved.weight_update).values()
    assert MWandaConfig(mean_compensation="none").resolve().weight_update == NoUpdate()
    assert MWandaConfig.from_dict(json.loads(json.dumps(resolved.to_dict()))) == resolved


def test_a_config_changed_after_the_pruner_was_built_cannot_prune_a_different_target():
    """Issue 30.6: configs are frozen, so the pruner prunes what was validated and reported."""
    pruner = Pruner(WandaConfig(sparsity=0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        pruner.config.mask_structure = "3:4"
    # Forced past the freeze, prune_model validates again before touching the model.
    object.__setattr__(pruner.config, "mask_structure", "3:4")
    with pytest.raises(ValueError, match="sparsity 0.25"):
        pruner.prune_model(make_model("llama"), make_token_calibration(), show_progress=False)
    # Deriving a new config validates it too.
    with pytest.raises(ValueError, match="set sparsity=0.25"):
        dataclasses.replace(WandaConfig(), mask_structure="3:4")


def test_the_report_records_the_resolved_config_and_its_parts():
    config = MWandaConfig(mask_structure="2:4")
    calibration = make_token_calibration(n=8)  # 3 languages x 8 x 24 = 576 tokens
    report = Pruner(config).prune_model(make_model("llama"), calibration, show_progress=False)
    assert report.config.weight_update == ColumnSweep(128, 0.01, 0.3, {64: 4, 128: 2}, "greedy", 5)
    assert config.weight_update is None
    parts = report.to_dict()["method_description"]["parts"]
    assert [p["role"] for p in parts] == ["mask score", "weight update", "layer schedule"]
    assert parts[1]["settings"]["hessian_token_stride"] == {64: 4, 128: 2}
    assert describe_method(report.config).title == "M-Wanda"


def test_old_flat_config_json_still_loads_with_a_deprecation_warning():
    old = {
        "method": "mwanda", "sparsity": 0.5, "mask_structure": "2:4", "layerwise": "uniform",
        "mean_compensation": "language", "compensation_rank": 0, "weight_update": "sweep",
        "hessian_token_stride": None, "diagonal_dampening": 0.3, "nm_selection": "joint", "refinement_steps": 5,
        "optimum_mwanda_version": "0.1.0",
    }  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = PruningConfig.from_dict(old)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert config.weight_update == ColumnSweep(
        diagonal_dampening=0.3, nm_selection="joint", refinement_steps=5
    )
    assert config.resolve().weight_update == ColumnSweep(128, 0.01, 0.3, None, "joint", 5)
    closed = {**old, "mask_structure": "unstructured", "sparsity": 0.6, "layerwise": "depth",
              "weight_update": "closed_form", "compensation_rank": 8, "diagonal_dampening": 0.0,
              "nm_selection": "greedy", "refinement_steps": 0}  # fmt: skip
    assert PruningConfig.from_dict(closed).resolve().weight_update == ClosedForm(8, 0.0)
    report = {"method": "mwanda", "config": closed, "target_sparsity": 0.6}
    assert PruningReport.from_dict(report).config.resolve().weight_update == ClosedForm(8, 0.0)
