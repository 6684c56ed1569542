"""The typed report: the config object inside, JSON compatible with reports written before."""

from __future__ import annotations

import json

import pytest

from optimum_mwanda import MWandaConfig, PruningReport, SparseGPTConfig, WandaConfig
from optimum_mwanda.version import __version__


def _report(config) -> PruningReport:
    return PruningReport(
        method=config.method,
        config=config,
        target_sparsity=config.sparsity,
        layer_sparsity=[0.5, 0.5],
        module_sparsity={"model.layers.0.mlp.up_proj": 0.5},
        module_shapes={"model.layers.0.mlp.up_proj": [8, 4]},
        languages=["en", "sw"],
        calibration_settings={"seq_len": 64},
    )


@pytest.mark.parametrize(
    "config", [MWandaConfig(sparsity=0.4), WandaConfig(), SparseGPTConfig(block_size=64)]
)
def test_round_trip_keeps_the_config_object(config):
    report = _report(config)
    data = json.loads(report.to_json())
    assert data["config"] == {**config.to_dict(), "optimum_mwanda_version": __version__}
    back = PruningReport.from_dict(data)
    assert type(back.config) is type(config) and back.config == config
    assert back.calibration_settings == {"seq_len": 64} and back.to_dict() == report.to_dict()


def test_reports_written_before_the_typed_config_still_load():
    old = {
        "method": "mwanda",
        "config": {"method": "mwanda", "sparsity": 0.5, "layerwise": "uniform", "optimum_mwanda_version": "0.0.9",
                   "removed_knob": 1},
        "target_sparsity": 0.5,
        "module_sparsity": {},
        "module_shapes": {},
        "achieved_sparsity": 0.0,
    }  # fmt: skip
    report = PruningReport.from_dict(old)
    assert isinstance(report.config, MWandaConfig) and report.config.layerwise == "uniform"
    assert report.config.mean_compensation == MWandaConfig().mean_compensation  # defaults live in one place
    assert report.optimum_mwanda_version == "0.0.9" and report.calibration_settings == {}
    assert report.to_dict()["config"]["optimum_mwanda_version"] == "0.0.9"


def test_pruner_records_the_calibration_knobs_that_applied():
    import torch
    from tiny_models import make_model

    from optimum_mwanda import Pruner

    pruner = Pruner(WandaConfig(sparsity=0.5, samples_per_language=3, seed=7))
    report = pruner.prune_model(
        make_model("llama"), {"en": torch.randint(3, 100, (2, 16))}, show_progress=False
    )
    assert report.config is pruner.config
    # Token ids: no sampling knob applied, only what the tensors show.
    assert report.calibration_settings == {"seq_len": 16, "sequences_per_language": {"en": 2}}


def test_pruner_records_the_sampling_knobs_when_it_packs_texts():
    from hub_fixtures import tiny_tokenizer
    from tiny_models import make_model

    from optimum_mwanda import Pruner

    config = WandaConfig(sparsity=0.5, samples_per_language=2, calibration_seq_len=16, seed=7)
    texts = {"en": ["the quick brown fox jumps over the lazy dog " * 8] * 3}
    report = Pruner(config).prune_model(
        make_model("llama"), texts, tokenizer=tiny_tokenizer(), show_progress=False
    )
    assert report.calibration_settings == {"seq_len": 16, "sequences_per_language": {"en": 2}, "seed": 7}
