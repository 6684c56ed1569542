"""The coverage contract: every decoder-layer matrix is pruned or named with a reason, never silently dense."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_models import make_model, make_moe_model, make_token_calibration
from torch import nn

from optimum_mwanda import (
    CoveragePlan,
    IncompleteCoverageError,
    Pruner,
    PruningReport,
    WandaConfig,
    verify_sparsity,
)
from optimum_mwanda.modeling import find_decoder_stack, plan_coverage, prunable_weights_by_layer

torch.set_num_threads(1)

CALIBRATION = dict(n=2, seq_len=16)


def _plan(model, ignore=()):
    stack = find_decoder_stack(model)
    return plan_coverage(stack, prunable_weights_by_layer(stack, list(ignore)), list(ignore))


def test_dense_model_plan_lists_every_matrix_as_pruned():
    model = make_model("llama")
    plan = _plan(model)
    matrices = [n for n, p in model.model.layers.named_parameters() if p.dim() >= 2]
    assert len(plan.entries) == len(matrices)
    assert plan.complete and not plan.dense
    assert {e.name for e in plan.pruned} == {f"model.layers.{n}" for n in matrices}


def test_ignored_and_router_weights_are_listed_with_their_reason():
    plan = _plan(make_moe_model("qwen2_moe"), ignore=["self_attn.o_proj"])
    reasons = {e.name: e.reason for e in plan.dense}
    assert reasons["model.layers.0.self_attn.o_proj.weight"] == "ignored"
    assert reasons["model.layers.0.mlp.gate.weight"] == "router"
    assert reasons["model.layers.1.mlp.shared_expert_gate.weight"] == "router"  # an nn.Linear gate
    pruned = {e.name for e in plan.pruned}
    assert "model.layers.0.mlp.experts.gate_up_proj" in pruned
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in pruned
    biases = {e.name: e.reason for e in _plan(make_moe_model("gpt_oss")).dense}
    assert biases["model.layers.0.mlp.experts.down_proj_bias"] == "expert bias"


def test_unreachable_expert_tensors_are_refused_before_any_change():
    """Llama 4's experts are 3-D tensors outside transformers' fused-experts family: the run refuses and
    names them, and no weight has changed."""
    model = make_moe_model("llama4")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        IncompleteCoverageError, match=r"model\.layers\.0\.feed_forward\.experts\.gate_up_proj"
    ):
        Pruner(WandaConfig()).prune_model(model, make_token_calibration(**CALIBRATION), show_progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_allow_unpruned_prunes_the_rest_warns_and_counts_the_dense_weights(caplog):
    model = make_moe_model("llama4")
    router_before = model.model.layers[0].feed_forward.router.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="optimum_mwanda.modeling.coverage"):
        report = Pruner(WandaConfig()).prune_model(
            model, make_token_calibration(**CALIBRATION), show_progress=False, allow_unpruned=True
        )
    assert "feed_forward.experts.down_proj" in caplog.text
    unreachable = report.coverage.unreachable
    assert {e.name for e in unreachable} == {
        f"model.layers.{i}.feed_forward.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")
    }
    assert report.unpruned_weights == [e.name for e in unreachable]
    # The dense experts count in the achieved sparsity (well below the target), in the report as on disk.
    pruned = sum(report.module_shapes[n][0] * report.module_shapes[n][1] for n in report.module_sparsity)
    dense = sum(e.numel for e in unreachable)
    assert report.achieved_sparsity == pytest.approx(0.5 * pruned / (pruned + dense), abs=1e-3)
    verification = verify_sparsity(model)
    assert verification.overall == pytest.approx(report.achieved_sparsity, abs=1e-9)
    assert verification.module_sparsity["model.layers.0.feed_forward.experts.gate_up_proj"] == 0.0
    assert verify_sparsity(model, "2:4").nm_ok is False
    # The nn.Linear router is never pruned.
    assert torch.equal(model.model.layers[0].feed_forward.router.weight, router_before)
    assert "model.layers.0.feed_forward.router" not in report.module_sparsity


def test_unknown_matrix_parameter_is_unreachable():
    model = make_model("llama")
    model.model.layers[1].mlp.register_parameter("scale_table", nn.Parameter(torch.ones(4, 64)))
    plan = _plan(model)
    [entry] = plan.unreachable
    assert entry.name == "model.layers.1.mlp.scale_table" and entry.shape == (4, 64)
    with pytest.raises(IncompleteCoverageError, match="scale_table"):
        plan.enforce(allow_unpruned=False)


def test_report_keeps_the_plan_and_old_reports_still_load():
    model = make_moe_model("mixtral")
    report = Pruner(WandaConfig()).prune_model(
        model, make_token_calibration(**CALIBRATION), show_progress=False
    )
    data = report.to_dict()
    again = PruningReport.from_dict(data)
    assert isinstance(again.coverage, CoveragePlan)
    assert again.coverage == report.coverage
    assert again.experts == report.experts
    assert again.routing_shares == report.routing_shares
    assert again.achieved_sparsity == pytest.approx(report.achieved_sparsity)
    old = {k: v for k, v in data.items() if k not in ("coverage", "experts", "expert_options")}
    legacy = PruningReport.from_dict(old)
    assert legacy.coverage is None and legacy.experts == {} and legacy.unpruned_weights == []


def test_cli_flag_reaches_the_pruner():
    import argparse

    from optimum_mwanda.cli.arguments import add_coverage_arguments

    parser = argparse.ArgumentParser()
    add_coverage_arguments(parser)
    args = parser.parse_args(["--allow-unpruned", "--expert-weighting", "none", "--expert-min-tokens", "4"])
    assert args.allow_unpruned and args.expert_weighting == "none" and args.expert_min_tokens == 4
