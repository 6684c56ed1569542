"""verify_sparsity: measured sparsity per module and overall, N:M checks (Linear and GPT-2 Conv1D)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hub_fixtures import decoder_linears, make_report, prune_by_magnitude, tiny_gpt2, tiny_llama

from optimum_mwanda import verify_sparsity
from optimum_mwanda.hub import build_sparsity_config
from optimum_mwanda.hub.verification import nm_violations, zero_fraction


def test_nm_violations_counts_groups_per_row():
    weight = torch.tensor(
        [
            [1.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 4.0],  # 2 + 2 non-zeros: fine
            [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # 3 in the first group: one violation
        ]
    )
    assert nm_violations(weight, 2, 4) == 1
    assert nm_violations(weight, 3, 4) == 0
    # A trailing partial group is held to the same N: [5, 6, 7] has three non-zeros.
    assert nm_violations(torch.tensor([[1.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0]]), 2, 4) == 1
    with pytest.raises(ValueError, match="2-D"):
        nm_violations(torch.ones(4), 2, 4)


def test_zero_fraction():
    assert zero_fraction(torch.tensor([0.0, -0.0, 1.0, 2.0])) == 0.5
    assert zero_fraction(torch.empty(0)) == 0.0


def test_unstructured_model_measures_half_and_fails_two_four():
    model = tiny_llama(seed=4)
    prune_by_magnitude(model, 0.5)
    result = verify_sparsity(model)
    assert result.nm_ok is None and result.mask_structure is None
    assert set(result.module_sparsity) == set(decoder_linears(model))
    assert all(v == pytest.approx(0.5) for v in result.module_sparsity.values())
    assert result.overall == pytest.approx(0.5)
    assert result.layer_sparsity == pytest.approx({0: 0.5, 1: 0.5})

    checked = verify_sparsity(model, "2:4")
    assert checked.nm_ok is False
    assert set(checked.violations) == set(decoder_linears(model))  # per-row pruning ignores the groups


def test_two_four_pruned_llama_passes():
    model = tiny_llama(seed=5)
    prune_by_magnitude(model, nm=(2, 4))
    result = verify_sparsity(model, "2:4")
    assert result.nm_ok is True and result.violations == {}
    assert result.overall == pytest.approx(0.5)
    # One extra non-zero in one group is caught and attributed to its module.
    weight = model.model.layers[1].mlp.up_proj.weight
    with torch.no_grad():
        group = weight[3, :4]
        group[group == 0] = 1.0
    broken = verify_sparsity(model, "2:4")
    assert broken.nm_ok is False and broken.violations == {"model.layers.1.mlp.up_proj": 1}


def test_gpt2_conv1d_is_checked_along_its_input_dimension():
    model = tiny_gpt2(seed=6)
    prune_by_magnitude(model, nm=(2, 4))  # groups along the input (first) dimension of Conv1D's [in, out]
    assert verify_sparsity(model, "2:4").nm_ok is True
    # Transposed the pattern would not hold: the check really reads Conv1D weights as [in, out].
    conv = model.transformer.h[0].mlp.c_fc.weight
    assert nm_violations(conv, 2, 4) > 0
    assert nm_violations(conv.t(), 2, 4) == 0


def test_defaults_come_from_the_recorded_sparsity_config():
    model = tiny_llama(seed=8)
    prune_by_magnitude(model, nm=(2, 4))
    with torch.no_grad():  # a module the run left dense
        model.model.layers[0].self_attn.o_proj.weight.normal_()
    report = make_report(model, ["en"], method="wanda", mask_structure="2:4")
    report.config = dataclasses.replace(report.config, ignore=["*.o_proj"])  # configs are frozen
    model.config.sparsity_config = build_sparsity_config(report)
    result = verify_sparsity(model)
    assert result.mask_structure == "2:4" and result.nm_ok is True
    assert "model.layers.0.self_attn.o_proj" not in result.module_sparsity
    # Naming the dense module explicitly checks it, and it fails.
    explicit = verify_sparsity(model, modules=["model.layers.0.self_attn.o_proj"])
    assert explicit.nm_ok is False and explicit.module_sparsity["model.layers.0.self_attn.o_proj"] == 0.0


def test_bad_arguments_are_rejected():
    model = tiny_llama()
    with pytest.raises(TypeError, match="torch.nn.Module"):
        verify_sparsity({"weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="malformed"):
        verify_sparsity(model, "two of four")
    with pytest.raises(ValueError, match="lm_head"):
        verify_sparsity(model, modules=["lm_head"])
