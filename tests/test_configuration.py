import json

import pytest

from optimum_mwanda import MWandaConfig, PruningConfig, SparseGPTConfig, WandaConfig, __version__
from optimum_mwanda.configuration import MWANDA_DEFAULTS


def flat_form(config: MWandaConfig) -> dict:
    """The dict versions before the weight-update parts wrote: every setting flat and resolved."""
    data = config.to_dict()
    update = config.resolve().weight_update
    data["weight_update"] = "sweep" if update.name == "sweep" else "closed_form"
    for name in ("compensation_rank", "hessian_token_stride", "diagonal_dampening", "nm_selection",
                 "refinement_steps"):  # fmt: skip
        data[name] = getattr(config, name)
    return data


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match="0 <= sparsity < 1"):
        WandaConfig(sparsity=sparsity)


@pytest.mark.parametrize("structure", ["2-4", "2:", "a:b", "24", ""])
def test_malformed_nm(structure):
    with pytest.raises(ValueError, match="malformed"):
        WandaConfig(mask_structure=structure)


@pytest.mark.parametrize("structure", ["4:4", "0:4", "5:4", "1:1"])
def test_impossible_nm(structure):
    with pytest.raises(ValueError, match="impossible"):
        WandaConfig(mask_structure=structure)


def test_nm_sparsity_must_match():
    assert WandaConfig(mask_structure="2:4").nm_structure == (2, 4)
    assert SparseGPTConfig(sparsity=0.75, mask_structure="1:4").nm_structure == (1, 4)
    with pytest.raises(ValueError, match="set sparsity=0.75"):
        WandaConfig(sparsity=0.5, mask_structure="1:4")


def test_cwl_only_for_mwanda():
    with pytest.raises(ValueError, match="not available for WandaConfig"):
        WandaConfig(layerwise="cwl")
    with pytest.raises(ValueError, match="not available"):
        SparseGPTConfig(layerwise="cwl")
    assert MWandaConfig(layerwise="cwl").layerwise == "cwl"
    assert WandaConfig(layerwise="owl").layerwise_range == 0.08


def test_layerwise_range_must_fit():
    with pytest.raises(ValueError, match="layerwise_range"):
        WandaConfig(sparsity=0.95, layerwise="owl", layerwise_range=0.08)


def test_other_field_errors():
    with pytest.raises(ValueError, match="block_size"):
        SparseGPTConfig(block_size=0)
    with pytest.raises(ValueError, match="dampening"):
        SparseGPTConfig(dampening=0)
    with pytest.raises(ValueError, match="variance_weight"):
        MWandaConfig(variance_weight=-1)
    with pytest.raises(ValueError, match="samples_per_language"):
        WandaConfig(samples_per_language=0)
    with pytest.raises(TypeError, match="ignore"):
        WandaConfig(ignore=[""])


def test_method_is_fixed_per_class():
    assert WandaConfig().method == "wanda"
    assert SparseGPTConfig().method == "sparsegpt"
    assert MWandaConfig().method == "mwanda"
    assert SparseGPTConfig().block_size == 128 and SparseGPTConfig().dampening == 0.01


@pytest.mark.parametrize(
    "config",
    [
        WandaConfig(sparsity=0.6, ignore=["*.o_proj"], layerwise="owl"),
        SparseGPTConfig(mask_structure="2:4", block_size=64),
        MWandaConfig(variance_weight=0.5, layerwise="cwl", cwl_protect="shared"),
    ],
)
def test_round_trip(config, tmp_path):
    data = config.to_dict()
    assert data["method"] == config.method
    assert data["optimum_mwanda_version"] == __version__
    assert PruningConfig.from_dict(data) == config
    assert type(config).from_dict(data) == config
    path = tmp_path / "config.json"
    config.to_json_file(path)
    assert json.loads(path.read_text())["method"] == config.method
    assert PruningConfig.from_json_file(path) == config


def test_from_dict_errors():
    with pytest.raises(ValueError, match="unknown pruning method"):
        PruningConfig.from_dict({"method": "magnitude"})
    with pytest.raises(ValueError, match="unknown WandaConfig fields"):
        WandaConfig.from_dict({"method": "wanda", "block_size": 3})
    with pytest.raises(ValueError, match="cannot load"):
        WandaConfig.from_dict(SparseGPTConfig().to_dict())


def test_default_layer_schedule_is_resolved_per_method():
    from optimum_mwanda import MWandaConfig, SparseGPTConfig, WandaConfig

    assert MWandaConfig().layerwise == "depth"
    assert WandaConfig().layerwise == "uniform" and SparseGPTConfig().layerwise == "uniform"
    # Where a non-uniform schedule is impossible the default falls back to uniform instead of failing...
    assert MWandaConfig(sparsity=0.5, mask_structure="2:4").layerwise == "uniform"
    assert MWandaConfig(sparsity=0.05).layerwise == "uniform"
    # ...while an explicit request still fails clearly.
    with pytest.raises(ValueError, match="N:M"):
        MWandaConfig(sparsity=0.5, mask_structure="2:4", layerwise="depth")
    # The resolved value is what is stored, so a saved config rebuilds the same schedule.
    data = MWandaConfig().to_dict()
    assert data["layerwise"] == "depth" and MWandaConfig.from_dict(data) == MWandaConfig()
    assert WandaConfig(layerwise="depth").layerwise == "depth"
    with pytest.raises(ValueError, match="not available"):
        WandaConfig(layerwise="cwl")


def test_default_compensation_rank_is_resolved_from_the_compensation():
    from optimum_mwanda import MWandaConfig

    assert MWandaConfig().compensation_rank == MWANDA_DEFAULTS.compensation_rank == 32
    assert MWandaConfig(mean_compensation="pooled").compensation_rank == 32
    # Without a compensation there is nothing to extend: the default is 0, an explicit rank is an error.
    assert MWandaConfig(mean_compensation="none").compensation_rank == 0
    with pytest.raises(ValueError, match="needs a compensation"):
        MWandaConfig(mean_compensation="none", compensation_rank=8)
    assert MWandaConfig(compensation_rank=0).compensation_rank == 0
    data = flat_form(MWandaConfig())
    assert data["compensation_rank"] == 32
    assert MWandaConfig.from_dict(data).resolve() == MWandaConfig().resolve()
    assert MWandaConfig.from_dict(MWandaConfig().to_dict()) == MWandaConfig()


def test_configs_written_before_a_field_existed_rebuild_with_the_behaviour_they_ran_with():
    from optimum_mwanda import MWandaConfig, PruningConfig

    written = flat_form(MWandaConfig(sparsity=0.6))
    del written["compensation_rank"]  # a report written before the low-rank compensation existed
    assert PruningConfig.from_dict(written).compensation_rank == 0
    for later in MWandaConfig.fields_added_later:  # a report written before the compensation existed
        written.pop(later, None)
    assert (
        MWandaConfig.from_dict(written).resolve()
        == MWandaConfig(sparsity=0.6, mean_compensation="none").resolve()
    )
    # A hand-written dict (no package version) means today's defaults.
    assert MWandaConfig.from_dict({"method": "mwanda", "sparsity": 0.6}) == MWandaConfig(sparsity=0.6)


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "message"),
    [
        (WandaConfig, {"seed": 1.5}, TypeError, "seed must be an integer"),
        (WandaConfig, {"seed": "0"}, TypeError, "seed must be an integer"),
        (WandaConfig, {"seed": True}, TypeError, "seed must be an integer"),
        (WandaConfig, {"owl_outlier_threshold": float("nan")}, ValueError, "owl_outlier_threshold must be a finite"),
        (MWandaConfig, {"activation_threshold": float("nan")}, ValueError, "activation_threshold must be a finite"),
        (MWandaConfig, {"variance_weight": float("inf")}, ValueError, "variance_weight must be a finite"),
        (SparseGPTConfig, {"dampening": float("nan")}, ValueError, "dampening must be a finite"),
        (WandaConfig, {"layerwise_range": float("nan")}, ValueError, "layerwise_range must be a finite"),
        (WandaConfig, {"negative_weight": "1"}, TypeError, "negative_weight must be a number"),
    ],
)  # fmt: skip
def test_non_integer_seeds_and_non_finite_floats_are_rejected_when_built(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(**kwargs)
    with pytest.raises(error, match=message):
        cls.from_dict({**cls().to_dict(), **kwargs})


def test_weight_update_resolves_to_the_sweep_for_nm_structures_and_high_sparsity():
    from optimum_mwanda import MWandaConfig, PruningConfig, SparseGPTConfig

    unstructured = MWandaConfig()
    assert (unstructured.resolve().weight_update.name, unstructured.compensation_rank) == ("closed_form", 32)
    # From sweep_from_sparsity (0.65) up the unstructured default is the sweep too, shrunk by 0.3.
    threshold = MWANDA_DEFAULTS.sweep_from_sparsity
    assert threshold == 0.65
    assert MWandaConfig(sparsity=0.6).resolve().weight_update.name == "closed_form"
    assert MWandaConfig(sparsity=0.649).resolve().weight_update.name == "closed_form"
    for sparsity in (threshold, 0.8):
        high = MWandaConfig(sparsity=sparsity)
        assert (high.resolve().weight_update.name, high.compensation_rank, high.refinement_steps) == (
            "sweep",
            0,
            5,
        )
        assert high.diagonal_dampening == MWANDA_DEFAULTS.sweep_shrinkage == 0.3
        assert high.layerwise == "depth"
        # An explicit rank, or no compensation, keeps the closed form there as at N:M.
        assert (
            MWandaConfig(sparsity=sparsity, compensation_rank=32).resolve().weight_update.name
            == "closed_form"
        )
        assert (
            MWandaConfig(sparsity=sparsity, mean_compensation="none").resolve().weight_update.name == "none"
        )
        closed = MWandaConfig(sparsity=sparsity, weight_update="closed_form")
        assert (closed.compensation_rank, closed.diagonal_dampening) == (32, 0.1)
        # The resolved values are stored, so a config written at 70% rebuilds as it ran.
        assert MWandaConfig.from_dict(closed.to_dict()) == closed
        assert MWandaConfig.from_dict(high.to_dict()) == high
    assert MWandaConfig(weight_update="sweep").diagonal_dampening == 0.3
    nm = MWandaConfig(mask_structure="2:4")
    assert (nm.resolve().weight_update.name, nm.compensation_rank, nm.hessian_token_stride) == (
        "sweep",
        0,
        None,
    )
    with pytest.raises(ValueError, match="hessian_token_stride"):
        MWandaConfig(mask_structure="2:4", hessian_token_stride=0)
    # An explicit rank, or no compensation, keeps the closed form at N:M.
    assert (
        MWandaConfig(mask_structure="2:4", compensation_rank=0).resolve().weight_update.name == "closed_form"
    )
    assert MWandaConfig(mask_structure="4:8", mean_compensation="none").resolve().weight_update.name == "none"
    assert MWandaConfig(weight_update="sweep").compensation_rank == 0
    with pytest.raises(ValueError, match="weight_update must be one of"):
        MWandaConfig(weight_update="obs")
    with pytest.raises(ValueError, match="keep them"):
        MWandaConfig(weight_update="sweep", mean_compensation="none")
    with pytest.raises(ValueError, match="applies to"):
        MWandaConfig(weight_update="sweep", compensation_rank=8)
    with pytest.raises(ValueError, match="dividing its block"):
        MWandaConfig(mask_structure="1:3", sparsity=2 / 3)
    for config_class in (MWandaConfig, SparseGPTConfig):
        with pytest.raises(ValueError, match="hessian_token_stride"):
            config_class(hessian_token_stride=0)
    assert SparseGPTConfig().hessian_token_stride == 1
    # Both updates shrink towards the diagonal by default, the sweep more; SparseGPT keeps the reference
    # (0), and without a compensation there is nothing to shrink.
    assert nm.diagonal_dampening == MWANDA_DEFAULTS.sweep_shrinkage == 0.3
    assert unstructured.diagonal_dampening == MWANDA_DEFAULTS.closed_form_shrinkage == 0.1
    assert SparseGPTConfig().diagonal_dampening == 0.0
    assert MWandaConfig(mean_compensation="none").diagonal_dampening == 0.0
    assert MWandaConfig(mask_structure="2:4", diagonal_dampening=0).diagonal_dampening == 0
    assert MWandaConfig(diagonal_dampening=0).diagonal_dampening == 0
    assert MWandaConfig(diagonal_dampening=0.3).diagonal_dampening == 0.3
    with pytest.raises(ValueError, match='mean_compensation="none" has none'):
        MWandaConfig(diagonal_dampening=0.3, mean_compensation="none")
    for bad in (-0.1, float("nan"), float("inf"), True, "0.3"):
        for config_class in (MWandaConfig, SparseGPTConfig):
            with pytest.raises((ValueError, TypeError), match="diagonal_dampening"):
                config_class(mask_structure="2:4", diagonal_dampening=bad)
    # Round trip, and configs written before the field existed ran the closed form.
    assert MWandaConfig.from_dict(nm.to_dict()) == nm
    written = flat_form(nm)
    del written["refinement_steps"], written["nm_selection"], written["diagonal_dampening"]
    # A sweep written before diagonal_dampening existed ran without the shrinkage.
    assert PruningConfig.from_dict(written).diagonal_dampening == 0.0
    del written["weight_update"]
    assert PruningConfig.from_dict(written).resolve().weight_update.name == "closed_form"


def test_sweep_selection_and_refinement_options():
    for config_class in (MWandaConfig, SparseGPTConfig):
        config = config_class(mask_structure="2:4", nm_selection="joint", refinement_steps=3)
        assert (config.nm_selection, config.refinement_steps) == ("joint", 3)
        assert config_class.from_dict(config.to_dict()) == config
        with pytest.raises(ValueError, match="nm_selection must be one of"):
            config_class(mask_structure="2:4", nm_selection="best")
        for bad in (-1, 1.5, True, "2"):
            with pytest.raises(ValueError, match="refinement_steps"):
                config_class(mask_structure="2:4", refinement_steps=bad)
    assert SparseGPTConfig().refinement_steps == 0 and SparseGPTConfig().nm_selection == "greedy"
    # M-Wanda's sweep refines by default (round 7); the closed form has nothing to refine.
    assert MWandaConfig(mask_structure="2:4").refinement_steps == MWANDA_DEFAULTS.refinement_steps == 5
    assert MWandaConfig().refinement_steps == 0
    assert MWandaConfig(mask_structure="2:4", refinement_steps=0).refinement_steps == 0
    with pytest.raises(ValueError, match='refinement_steps applies to weight_update="sweep"'):
        MWandaConfig(refinement_steps=2)
    # Configs written before the fields existed ran the greedy sweep with no refinement.
    written = flat_form(MWandaConfig(mask_structure="2:4"))
    del written["nm_selection"], written["refinement_steps"]
    rebuilt = PruningConfig.from_dict(written)
    assert (rebuilt.nm_selection, rebuilt.refinement_steps) == ("greedy", 0)
