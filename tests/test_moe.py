"""Mixture-of-experts pruning on tiny random models of every fused expert layout of transformers 5."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny_models import (
    HIDDEN,
    MOE_ARCHITECTURES,
    make_legacy_moe_model,
    make_moe_model,
    make_token_calibration,
)
from transformers import AutoModelForCausalLM

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda.hub import verify_sparsity
from optimum_mwanda.modeling import find_decoder_stack
from optimum_mwanda.modeling.experts import ExpertOptions, find_fused_experts
from optimum_mwanda.parts import mask_from_scores, wanda_scores

torch.set_num_threads(1)

CALIBRATION = dict(n=4, seq_len=16)


def _experts(model, layer: int):
    stack = find_decoder_stack(model)
    return find_fused_experts(stack.layers[layer], stack.layer_name(layer))[0]


def _moe_layer(model) -> int:
    """The last decoder layer with fused experts (DeepSeek-V3's first layer is dense)."""
    stack = find_decoder_stack(model)
    return max(i for i, layer in enumerate(stack.layers) if find_fused_experts(layer, ""))


def _routed_inputs(dense, pruned, layer: int, calibration):
    """What the experts of ``layer`` receive in the walk: layers before it pruned, it and later ones dense."""
    reference = copy.deepcopy(dense)
    stack, pruned_stack = find_decoder_stack(reference), find_decoder_stack(pruned)
    for i in range(layer):
        stack.layers[i].load_state_dict(pruned_stack.layers[i].state_dict())
    seen = {}

    def hook(_module, args):
        seen["args"] = args

    experts = _experts(reference, layer)
    handle = experts.module.register_forward_pre_hook(hook)
    ids = torch.cat(list(calibration.values()))
    with torch.no_grad():
        reference(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    return experts, seen["args"]


def _expert_rows(experts, args, e: int, weighted: bool, everyone: bool = False):
    """Inputs of expert ``e``'s two projections over its routed tokens (or every token)."""
    hidden, index, weights = args
    token, position = (index == e).nonzero(as_tuple=True)
    if everyone:
        token = torch.arange(hidden.shape[0])
    x = hidden[token]
    up = experts.weight(experts.up, e).read_weight()
    h = torch.nn.functional.linear(x, up)
    if experts.has_bias:
        h = h + getattr(experts.module, f"{experts.up}_bias")[e]
    h = experts.module._apply_gate(h)
    if weighted:
        scale = weights[token, position].unsqueeze(1)
        x, h = x * scale, h * scale
    return x, h


def _wanda_mask(weight: torch.Tensor, rows: torch.Tensor, sparsity: float = 0.5, nm=None) -> torch.Tensor:
    norm = (rows.double().pow(2).sum(0) / max(rows.shape[0], 1)).sqrt().float()
    return mask_from_scores(wanda_scores(weight, norm), sparsity, nm)


@pytest.mark.parametrize("architecture", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("weighted", [True, False])
def test_every_expert_mask_is_wanda_on_its_own_routed_tokens(architecture, weighted):
    calibration = make_token_calibration(**CALIBRATION)
    dense = make_moe_model(architecture)
    model = copy.deepcopy(dense)
    options = ExpertOptions(router_weighted=weighted, min_tokens=0)
    report = Pruner(WandaConfig(sparsity=0.5)).prune_model(
        model, calibration, show_progress=False, experts=options
    )
    layer = _moe_layer(dense)
    experts, args = _routed_inputs(dense, model, layer, calibration)
    pruned = _experts(model, layer)
    for e in range(experts.num_experts):
        x, h = _expert_rows(experts, args, e, weighted)
        assert x.shape[0] > 0
        for parameter, rows in ((experts.up, x), (experts.down, h)):
            expected = _wanda_mask(experts.weight(parameter, e).read_weight(), rows)
            got = pruned.weight(parameter, e).read_weight() == 0
            assert torch.equal(got, expected), f"{parameter}[{e}]"
    record = report.experts[experts.name]
    counts = torch.bincount(args[1].flatten(), minlength=experts.num_experts)
    assert record["tokens"] == counts.tolist()
    assert record["fallback"] == [False] * experts.num_experts


@pytest.mark.parametrize("architecture", MOE_ARCHITECTURES)
@pytest.mark.parametrize(
    "config",
    [
        WandaConfig(sparsity=0.5),
        WandaConfig(mask_structure="2:4"),
        SparseGPTConfig(sparsity=0.5),
        MWandaConfig(sparsity=0.5),
        MWandaConfig(sparsity=0.5, weight_update="sweep"),
    ],
    ids=["wanda", "wanda-2:4", "sparsegpt", "mwanda", "mwanda-sweep"],
)
def test_every_expert_is_pruned_to_the_target(architecture, config):
    model = make_moe_model(architecture)
    routers = {
        n: p.detach().clone() for n, p in model.named_parameters() if "gate.weight" in n or "router" in n
    }
    with warnings.catch_warnings():  # few tokens per expert: the sweeps warn about small Hessians
        warnings.simplefilter("ignore")
        report = Pruner(config).prune_model(model, make_token_calibration(**CALIBRATION), show_progress=False)
    verification = verify_sparsity(model)
    expert_names = [n for n in verification.module_sparsity if "experts." in n and "[" in n]
    assert len(expert_names) == 2 * 8 * sum(1 for _ in report.experts)
    for name in expert_names:
        target = report.layer_sparsity[int(name.split(".")[2])]  # M-Wanda's depth schedule varies it
        in_features = report.module_shapes[name][1]  # a row keeps a whole number of weights
        assert abs(verification.module_sparsity[name] - target) < 1 / in_features, name
        assert abs(report.module_sparsity[name] - verification.module_sparsity[name]) < 1e-9
    assert abs(report.achieved_sparsity - verification.overall) < 1e-3
    assert report.coverage.complete
    if config.nm_structure:
        assert verify_sparsity(model, "2:4").nm_ok
    # Routers and shared-expert gates are never pruned.
    for name, before in routers.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    ids = make_token_calibration(n=1, seq_len=8)["en"]
    assert torch.isfinite(model(ids).logits).all()


def test_experts_under_the_token_threshold_fall_back_to_every_token():
    """With a threshold above every expert's routed count, every expert is calibrated on all tokens entering
    its block (unweighted), in a second pass; the report records it per expert."""
    calibration = make_token_calibration(**CALIBRATION)
    dense = make_moe_model("qwen3_moe")
    model = copy.deepcopy(dense)
    report = Pruner(WandaConfig()).prune_model(
        model, calibration, show_progress=False, experts=ExpertOptions(min_tokens=10_000)
    )
    layer = _moe_layer(dense)
    experts, args = _routed_inputs(dense, model, layer, calibration)
    pruned = _experts(model, layer)
    for e in range(experts.num_experts):
        x, h = _expert_rows(experts, args, e, weighted=False, everyone=True)
        for parameter, rows in ((experts.up, x), (experts.down, h)):
            expected = _wanda_mask(experts.weight(parameter, e).read_weight(), rows)
            assert torch.equal(pruned.weight(parameter, e).read_weight() == 0, expected)
    assert all(all(record["fallback"]) for record in report.experts.values())
    assert report.expert_fallbacks == {name: list(range(8)) for name in report.experts}
    assert report.expert_options["min_tokens"] == 10_000


def test_threshold_marks_only_rare_experts():
    calibration = make_token_calibration(**CALIBRATION)
    model = make_moe_model("mixtral")
    probe = Pruner(WandaConfig()).prune_model(copy.deepcopy(model), calibration, show_progress=False)
    tokens = next(iter(probe.experts.values()))["tokens"]
    threshold = sorted(tokens)[len(tokens) // 2]  # the median: about half fall back
    report = Pruner(WandaConfig()).prune_model(
        model, calibration, show_progress=False, experts=ExpertOptions(min_tokens=threshold)
    )
    record = next(iter(report.experts.values()))
    assert record["fallback"] == [t < threshold for t in tokens]
    assert 0 < sum(record["fallback"]) < len(tokens)


def test_calibrate_all_experts_uses_every_token_and_keeps_the_layer_output():
    calibration = make_token_calibration(**CALIBRATION)
    dense = make_moe_model("gpt_oss")
    model = copy.deepcopy(dense)
    Pruner(WandaConfig()).prune_model(
        model, calibration, show_progress=False, experts=ExpertOptions(calibrate_all_experts=True)
    )
    layer = _moe_layer(dense)
    experts, args = _routed_inputs(dense, model, layer, calibration)
    pruned = _experts(model, layer)
    for e in range(experts.num_experts):
        x, h = _expert_rows(experts, args, e, weighted=False, everyone=True)
        expected = _wanda_mask(experts.weight(experts.up, e).read_weight(), x)
        assert torch.equal(pruned.weight(experts.up, e).read_weight() == 0, expected)


def test_routing_shares_per_language_match_the_router():
    calibration = make_token_calibration(languages=("en", "de", "sw"), **CALIBRATION)
    dense = make_moe_model("mixtral")
    model = copy.deepcopy(dense)
    report = Pruner(WandaConfig()).prune_model(model, calibration, show_progress=False)
    assert set(report.routing_shares) == {"en", "de", "sw"}
    # Layer 0 sees the dense embeddings: its routing is the dense model's.
    experts, args = _routed_inputs(dense, model, 0, calibration)
    index = args[1].view(3, -1, args[1].shape[-1])  # languages were concatenated in order
    for i, language in enumerate(["en", "de", "sw"]):
        counts = torch.bincount(index[i].flatten(), minlength=8).double()
        expected = (counts / counts.sum()).tolist()
        assert report.routing_shares[language][experts.name] == pytest.approx(expected, abs=1e-6)
        assert sum(report.routing_shares[language][experts.name]) == pytest.approx(1.0)


def test_moe_checkpoint_reloads_in_plain_transformers(tmp_path):
    model = make_moe_model("qwen3_moe")
    pruner = Pruner(WandaConfig())
    pruner.prune_model(model, make_token_calibration(**CALIBRATION), show_progress=False)
    ids = make_token_calibration(n=1, seq_len=8)["en"]
    with torch.no_grad():
        expected = model(ids).logits
    for compressed in (False, True):
        folder = pruner.save_pretrained(model, tmp_path / f"out-{compressed}", compressed=compressed)
        if compressed:
            from optimum_mwanda import load_pruned_model

            reloaded = load_pruned_model(folder)
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(ids).logits, expected)
        assert verify_sparsity(reloaded).overall == pytest.approx(pruner.report.achieved_sparsity, abs=1e-9)


def test_offloaded_experts_prune_like_in_memory(tmp_path):
    from accelerate import cpu_offload

    calibration = make_token_calibration(**CALIBRATION)
    model = make_moe_model("mixtral")
    model.save_pretrained(tmp_path / "dense")
    warnings.simplefilter("ignore")  # few tokens per expert: SparseGPT warns about small Hessians
    Pruner(SparseGPTConfig()).prune_model(model, calibration, show_progress=False)
    offloaded = cpu_offload(
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval(), execution_device="cpu"
    )
    Pruner(SparseGPTConfig()).prune_model(offloaded, calibration, show_progress=False)
    verification = verify_sparsity(offloaded)
    reference = verify_sparsity(model)
    assert verification.module_sparsity == reference.module_sparsity
    experts = _experts(offloaded, 1)
    assert experts.module.gate_up_proj.device.type == "meta"  # offloaded: read and written in the store
    for weight in experts.weights():
        expected = _experts(model, 1).weight(weight.parameter, weight.expert).read_weight()
        assert torch.equal(weight.read_weight(), expected)


def test_disk_offloaded_experts_prune_like_in_memory(tmp_path):
    calibration = make_token_calibration(**CALIBRATION)
    model = make_moe_model("qwen3_moe")
    model.save_pretrained(tmp_path / "dense")
    Pruner(WandaConfig()).prune_model(model, calibration, show_progress=False)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"model.layers.{i}": "disk" for i in range(2)})
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", device_map=device_map, offload_folder=str(tmp_path / "off")
    ).eval()
    assert _experts(offloaded, 0).module.gate_up_proj.device.type == "meta"
    Pruner(WandaConfig()).prune_model(offloaded, calibration, show_progress=False)
    for layer in range(2):
        for weight in _experts(offloaded, layer).weights():
            expected = _experts(model, layer).weight(weight.parameter, weight.expert).read_weight()
            assert torch.equal(weight.read_weight(), expected), weight.name
    assert not any(p.device.type == "cpu" for p in _experts(offloaded, 0).module.parameters())


def test_resume_restores_expert_weights(tmp_path):
    """A run interrupted after layer 0's file resumes (expert matrices from the layer file, expert records
    from the state) to the weights and report of an uninterrupted run."""
    import fault_injection as fi

    calibration = make_token_calibration(**CALIBRATION)
    config = MWandaConfig()
    full = make_moe_model("qwen3_moe")
    report = Pruner(config).prune_model(full, calibration, show_progress=False)
    with fi.io_steps(fi.raise_before("open", ".tmp-layer_1.safetensors")), pytest.raises(fi.InjectedFault):
        Pruner(config).prune_model(
            make_moe_model("qwen3_moe"), calibration, show_progress=False, checkpoint_dir=tmp_path / "ck"
        )
    again = make_moe_model("qwen3_moe")
    resumed = Pruner(config).prune_model(
        again, calibration, show_progress=False, checkpoint_dir=tmp_path / "ck"
    )
    assert resumed.resumed_from_layer == 1
    for (name, a), b in zip(full.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.experts == report.experts
    assert resumed.achieved_sparsity == pytest.approx(report.achieved_sparsity)


# -- experts as modules of nn.Linear (older transformers, remote code) ------------------------------------
def _legacy_layer0_inputs(model, calibration):
    seen = {}
    block = model.model.layers[0].mlp

    def hook(_module, args):
        seen["x"] = args[0].reshape(-1, HIDDEN)

    handle = block.register_forward_pre_hook(hook)
    ids = torch.cat(list(calibration.values()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    x = seen["x"]
    weights = torch.softmax(block.gate(x).float(), dim=-1)
    return x, torch.topk(weights, block.top_k, dim=-1)[1]


@pytest.mark.parametrize("min_tokens", [0, 45])
def test_per_module_experts_are_pruned_on_their_routed_tokens(min_tokens):
    """Experts that are nn.Linear modules in a ModuleList: each expert's linear statistics come from the
    tokens routed to it (matched to the block's input bit for bit); rare experts fall back to every token."""
    calibration = make_token_calibration(**CALIBRATION)
    dense = make_legacy_moe_model()
    model = copy.deepcopy(dense)
    gate = dense.model.layers[0].mlp.gate.weight.detach().clone()
    report = Pruner(WandaConfig()).prune_model(
        model, calibration, show_progress=False, experts=ExpertOptions(min_tokens=min_tokens)
    )
    x, index = _legacy_layer0_inputs(dense, calibration)
    record = report.experts["model.layers.0.mlp.experts"]
    counts = torch.bincount(index.flatten(), minlength=8)
    assert record["tokens"] == counts.tolist()
    assert record["fallback"] == [c < min_tokens for c in counts.tolist()]
    if min_tokens:
        assert 0 < sum(record["fallback"]) < 8
    for e, (expert, pruned) in enumerate(
        zip(dense.model.layers[0].mlp.experts, model.model.layers[0].mlp.experts)
    ):
        tokens = (
            torch.arange(x.shape[0]) if record["fallback"][e] else (index == e).any(dim=1).nonzero().flatten()
        )
        rows = x[tokens]
        hidden = torch.nn.functional.silu(expert.w1(rows)) * expert.w3(rows)
        for name, inputs in (("w1", rows), ("w3", rows), ("w2", hidden)):
            expected = _wanda_mask(getattr(expert, name).weight.detach(), inputs.detach())
            assert torch.equal(getattr(pruned, name).weight == 0, expected), f"expert {e} {name}"
    assert torch.equal(model.model.layers[0].mlp.gate.weight, gate)  # the router stays dense
    assert report.coverage.complete and abs(verify_sparsity(model).overall - 0.5) < 1e-6


def test_experts_layout_that_the_loop_does_not_reproduce_is_refused():
    """The per-expert loop is checked against the module's own forward on the first batch of every layer:
    an experts module that computes something else is an error (weights restored), not wrong statistics."""
    model = make_moe_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    own = type(experts).forward
    experts.forward = lambda hidden, index, weights: 2 * own(experts, hidden, index, weights)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.experts \(MixtralExperts\) differs"):
        Pruner(WandaConfig()).prune_model(model, make_token_calibration(**CALIBRATION), show_progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bfloat16_experts():
    model = make_moe_model("gpt_oss").to(torch.bfloat16)
    report = Pruner(WandaConfig()).prune_model(
        model, make_token_calibration(**CALIBRATION), show_progress=False
    )
    assert report.achieved_sparsity == pytest.approx(0.5)
    assert verify_sparsity(model).overall == pytest.approx(0.5)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_expert_hessians_see_every_routed_token():
    """M-Wanda's sweep samples every k-th token for full-width inputs; an expert, which sees about
    top_k / num_experts of the tokens, keeps all of its own."""
    from optimum_mwanda.methods import algorithm_for
    from optimum_mwanda.modeling import LayerStatisticsCollector
    from optimum_mwanda.modeling.linear import prunable_weights_by_layer

    algorithm = algorithm_for(MWandaConfig(weight_update="sweep", hessian_token_stride=4).resolve())
    assert algorithm.new_statistic(64, 1, "cpu").token_stride == 4
    stack = find_decoder_stack(make_moe_model("mixtral"))
    modules = prunable_weights_by_layer(stack, [])[0]
    collector = LayerStatisticsCollector(
        modules,
        lambda n, device: algorithm.new_statistic(n, 1, device),
        new_expert_statistic=lambda n, device: algorithm.new_expert_statistic(n, 1, device),
    )
    expert_statistics = collector.statistics[: len(collector.expert_weights)]
    assert expert_statistics and all(s.token_stride == 1 for s in expert_statistics)
