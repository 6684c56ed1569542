"""The options that make a large run fit (float32 Hessian sums, statistics offloaded to the CPU, a pre-run
memory check) and the memory formulas they are judged by (optimum_mwanda.memory)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import linear_weights, make_model, make_token_calibration

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda.memory import (
    InsufficientMemoryError,
    LayerShape,
    LinearGroup,
    MethodSpec,
    groups_of_modules,
    layer_peak,
    run_peak,
    statistic_bytes,
    update_peak,
)
from optimum_mwanda.parts import FeatureStatistics, HessianStatistics, refine_kept_weights
from optimum_mwanda.parts import sparsegpt as sparsegpt_parts
from optimum_mwanda.parts.sparsegpt import inverse_hessian_cholesky, upper_inverse_factor
from optimum_mwanda.parts.statistics import MAX_GROUP_TOKENS, hessian_from_lower_sum, symmetric_from_lower

torch.set_num_threads(1)


def _tokens(lengths: list[int], features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), features, generator=generator) * torch.rand(features, generator=generator)
    return x, torch.zeros(sum(lengths), dtype=torch.long)


# -- float32 Hessian sums ----------------------------------------------------------------------------------
def test_float32_hessian_matches_the_float64_sum_and_keeps_batch_independence():
    lengths = [300, 40, 250, 7]
    x, language = _tokens(lengths, 48)
    reference = HessianStatistics(48, 1)
    reference.update(x, language, lengths)
    single = HessianStatistics(48, 1, dtype=torch.float32)
    single.update(x, language, lengths)
    assert single.hessian_sum.dtype == torch.float32
    # Within float32 rounding of the float64 path (stated tolerance: 1e-5 relative).
    torch.testing.assert_close(single.hessian, reference.hessian, rtol=1e-5, atol=1e-5)
    # Sequences are added one at a time in order: any batching gives the same bits.
    batched = HessianStatistics(48, 1, dtype=torch.float32)
    for part, lang, n in zip(x.split(lengths), language.split(lengths), lengths):
        batched.update(part, lang, [n])
    assert torch.equal(batched.hessian, single.hessian)
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianStatistics(4, 1, dtype=torch.float16)


def test_release_hessian_frees_the_sum_and_a_float32_sum_becomes_h_in_place():
    x, language = _tokens([200, 200], 40)
    for dtype in (torch.float64, torch.float32):
        statistic = HessianStatistics(40, 1, dtype=dtype)
        statistic.update(x, language, [200, 200])
        expected = statistic.hessian.clone()
        pointer = statistic.hessian_sum.data_ptr()
        statistic._hessian = None  # as before the sweep: nothing cached
        released = statistic.release_hessian()
        assert torch.equal(released, expected)
        assert released.dtype == torch.float32
        assert (released.data_ptr() == pointer) == (dtype == torch.float32)
        assert statistic.hessian_sum is None
        with pytest.raises(RuntimeError, match="released"):
            statistic.update(x, language, [200, 200])


def test_blockwise_mirror_is_the_plain_symmetric_scaled_product():
    """hessian_from_lower_sum (block by block, no n x n float64 temporaries) gives the same bits as
    ``(symmetric_from_lower(total) * scale).float()``, across block edges."""
    from optimum_mwanda.parts import statistics

    total = torch.randn(70, 70, dtype=torch.float64)
    expected = (symmetric_from_lower(total) * 0.37).float()
    for block in (8, 33, 512):
        statistics._MIRROR_BLOCK, old = block, statistics._MIRROR_BLOCK
        try:
            assert torch.equal(hessian_from_lower_sum(total, 0.37), expected)
        finally:
            statistics._MIRROR_BLOCK = old


# -- the inverse's factor and the chunked refinement --------------------------------------------------------
@pytest.mark.parametrize("n", [5, 128, 129, 300])
def test_reversed_cholesky_gives_the_upper_factor_of_the_inverse(n):
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=generator, dtype=torch.float64)
    h = x.t() @ x / (2 * n)
    upper, info = upper_inverse_factor(h)
    assert info == 0
    assert torch.equal(upper, upper.triu()) and (upper.diagonal() > 0).all()
    torch.testing.assert_close(upper, torch.linalg.cholesky(torch.linalg.inv(h), upper=True))
    # SparseGPT's three-step float32 computation, to float32 accuracy.
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.float())), upper=True)
    factor, dead, damp = inverse_hessian_cholesky(h.float(), 0.0)
    assert damp == 0.0 and not dead.any()
    torch.testing.assert_close(factor, reference, rtol=1e-3, atol=1e-4 * float(reference.abs().max()))
    assert upper_inverse_factor(-h)[0] is None


def test_refinement_in_row_chunks_equals_one_chunk(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=generator)
    h = x.t() @ x / 400 + 0.01 * torch.eye(24)
    dense = torch.randn(50, 24, generator=generator)
    keep = torch.rand(50, 24, generator=generator) > 0.5
    start = dense * keep
    whole = refine_kept_weights(dense, start, keep, h, 4)
    monkeypatch.setattr(sparsegpt_parts, "_REFINEMENT_CHUNK_ROWS", 7)  # below in_features: chunks of 24
    chunked = refine_kept_weights(dense, start.clone(), keep, h, 4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    in_place = start.clone()
    assert refine_kept_weights(dense, in_place, keep, h, 4, out=in_place) is in_place
    torch.testing.assert_close(in_place, whole, rtol=1e-5, atol=1e-6)


# -- the options end to end ----------------------------------------------------------------------------------
def _prune(config, **kwargs) -> dict[str, torch.Tensor]:
    model = make_model("llama")
    Pruner(config).prune_model(model, make_token_calibration(), show_progress=False, **kwargs)
    return linear_weights(model)


@pytest.mark.parametrize(
    "config",
    [
        SparseGPTConfig(sparsity=0.5, calibration_seq_len=24),
        MWandaConfig(sparsity=0.7, calibration_seq_len=24),
        MWandaConfig(mask_structure="2:4", calibration_seq_len=24),
    ],
    ids=["sparsegpt", "mwanda-sweep-70", "mwanda-sweep-2of4"],
)
def test_float32_statistics_and_offload_match_the_float64_run(config):
    reference = _prune(config)
    offloaded = _prune(config, offload_statistics=True)
    for name, value in reference.items():
        assert torch.equal(offloaded[name], value), name  # offloading only moves tensors
    single = _prune(config, statistics_dtype="float32")
    agree = total = 0
    for name, value in reference.items():
        agree += int(((single[name] == 0) == (value == 0)).sum())
        total += value.numel()
        # Stated tolerance: float32 rounding of H moves a few near-tie mask entries and the weights the
        # sweep then updates; the pruned weights stay within 1e-2 of the float64 run's.
        torch.testing.assert_close(single[name], value, rtol=0, atol=1e-2)
    assert agree / total > 0.99


def test_statistics_dtype_is_validated_before_anything_changes():
    model = make_model("llama")
    before = linear_weights(model)
    with pytest.raises(ValueError, match="statistics_dtype"):
        Pruner(SparseGPTConfig(sparsity=0.5, calibration_seq_len=24)).prune_model(
            model, make_token_calibration(), show_progress=False, statistics_dtype="float16"
        )
    for name, value in linear_weights(model).items():
        assert torch.equal(value, before[name])


@pytest.mark.parametrize(
    "config", [SparseGPTConfig(sparsity=0.5, calibration_seq_len=24), WandaConfig(sparsity=0.5)]
)
def test_a_run_that_would_not_fit_is_refused_before_any_weight_changes(config):
    model = make_model("llama")
    before = linear_weights(model)
    with pytest.raises(InsufficientMemoryError) as error:
        Pruner(config).prune_model(model, make_token_calibration(), show_progress=False, memory_budget=10_000)
    message = str(error.value)
    assert "nothing was changed" in message and "needs about" in message and "MiB" in message
    assert 'activations_device="cpu"' in message
    if isinstance(config, SparseGPTConfig):
        assert 'statistics_dtype="float32"' in message and "offload_statistics=True" in message
    for name, value in linear_weights(model).items():
        assert torch.equal(value, before[name]), name
    # A budget above the prediction runs.
    Pruner(config).prune_model(model, make_token_calibration(), show_progress=False, memory_budget=2**34)
    assert any((value == 0).float().mean() > 0.4 for value in linear_weights(model).values())


def test_the_check_counts_the_options_that_lower_the_peak():
    """With float32 sums and offloaded statistics a budget between the two predictions is enough."""
    spec64 = MethodSpec("sparsegpt", statistics_bytes=8)
    spec32 = MethodSpec("sparsegpt", statistics_bytes=4)
    shape = LayerShape(hidden=4096, intermediate=14336, heads=32, kv_heads=8)
    plain = run_peak(spec64, shape, 128 * 2048, 4 * 2048)
    light = run_peak(
        spec32, shape, 128 * 2048, 4 * 2048, offload_statistics=True, activations_on_device=False
    )
    assert light.total < plain.total
    assert light.statistics * 2 == plain.statistics
    # The statistics pass of a sweep also holds the sampled tokens waiting for their sequence group's
    # product: up to MAX_GROUP_TOKENS float32 rows of each dense group's input (q/k/v, o, gate/up, down).
    wanda = run_peak(MethodSpec("wanda"), shape, 128 * 2048, 4 * 2048)
    assert plain.forward - wanda.forward == 4 * MAX_GROUP_TOKENS * (3 * 4096 + 14336)


# -- the formulas -------------------------------------------------------------------------------------------
def test_statistic_bytes_count_the_statistics_tensors():
    group = LinearGroup("g", 40, (16, 8))
    cases = [
        (MethodSpec("wanda", languages=3), FeatureStatistics(40, 3)),
        (
            MethodSpec("mwanda_closed_form", languages=3),
            FeatureStatistics(40, 3, track_activation=True, track_mean=True),
        ),
        (MethodSpec("sparsegpt"), HessianStatistics(40, 3)),
        (MethodSpec("mwanda_sweep", statistics_bytes=4), HessianStatistics(40, 3, dtype=torch.float32)),
    ]
    for spec, statistic in cases:
        counted = sum(t.numel() * t.element_size() for t in statistic.raw_sums().values())
        predicted = statistic_bytes(spec, group)
        assert predicted <= counted <= predicted + 8 * 3 + 8, spec.method  # token counts aside


def test_layer_shapes_and_groups():
    shape = LayerShape(hidden=4096, intermediate=14336, heads=32, kv_heads=8)
    assert shape.params == 218_103_808  # Llama-3.1-8B's decoder layer, norms aside
    names = [g.name for g in shape.groups]
    assert names == ["qkv", "o", "gate_up", "down"]
    moe = LayerShape(2048, 6144, 32, 4, 128, experts=128, active_experts=8, moe_intermediate=768)
    assert moe.groups[2].count == 128 and moe.groups[3].in_features == 768
    model = make_model("llama")
    modules = [
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers.0." in name
    ]
    groups = groups_of_modules(modules)
    assert [len(g.rows) for g in groups] == [3, 1, 2, 1]
    assert LayerShape.from_config(model.config).groups[0].rows == (64, 32, 32)


def test_sweep_peaks_follow_the_options():
    group = LinearGroup("down", 14336, (4096,))
    plain = MethodSpec("sparsegpt", statistics_bytes=8)
    single = MethodSpec("sparsegpt", statistics_bytes=4)
    # The factorisation, not the float64 sum, sets the update's peak; the waiting statistics halve.
    assert update_peak(single, group) <= update_peak(plain, group)
    groups = LayerShape(4096, 14336, 32, 8).groups
    assert layer_peak(single, groups).step < layer_peak(plain, groups).step
    waiting = layer_peak(plain, groups)
    offloaded = layer_peak(plain, groups, offload_statistics=True)
    assert offloaded.step <= waiting.step and offloaded.update == waiting.update
    with pytest.raises(ValueError):
        MethodSpec("magnitude")


def test_offloaded_and_float32_statistics_on_a_mixture_of_experts_model():
    """The options run on an MoE model (dense groups offloaded; the experts' statistics stay) and give the
    float64 run's weights (offload) or the same masks up to near-ties (float32)."""
    import warnings

    from tiny_models import MOE_ARCHITECTURES, make_moe_model

    config = SparseGPTConfig(sparsity=0.5, calibration_seq_len=24)
    results = []
    for options in ({}, {"offload_statistics": True}, {"statistics_dtype": "float32"}):
        model = make_moe_model(MOE_ARCHITECTURES[0])
        with warnings.catch_warnings():  # few tokens per expert: small Hessians warn
            warnings.simplefilter("ignore")
            Pruner(config).prune_model(model, make_token_calibration(), show_progress=False, **options)
        results.append({n: p.detach().clone() for n, p in model.named_parameters() if p.dim() >= 2})
    reference, offloaded, single = results
    for name, value in reference.items():
        assert torch.equal(offloaded[name], value), name
        assert ((single[name] == 0) == (value == 0)).float().mean() > 0.98, name
