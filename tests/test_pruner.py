"""The Pruner on tiny models of every supported architecture."""

import copy
import warnings

import pytest
import torch
from tiny_models import (
    ARCHITECTURES,
    VOCAB,
    linear_weights,
    make_model,
    make_token_calibration,
    make_tokenizer,
    text_corpus,
)
from torch import nn

from optimum_mwanda import CalibrationSet, MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda.configuration import MWANDA_DEFAULTS
from optimum_mwanda.modeling import find_decoder_stack, find_prunable_linears


def _masks(model) -> dict[str, torch.Tensor]:
    stack = find_decoder_stack(model)
    masks = {}
    for i, layer in enumerate(stack.layers):
        for module in find_prunable_linears(layer, stack.layer_name(i), []):
            masks[module.name] = module.read_weight() == 0
    return masks


def _reference_wanda(model, calibration: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """An independent, deliberately plain Wanda: full forward passes with hooks, one layer at a time."""
    model = copy.deepcopy(model)
    ids = torch.cat(list(calibration.values()))
    stack = find_decoder_stack(model)
    masks = {}
    for i, layer in enumerate(stack.layers):
        modules = find_prunable_linears(layer, stack.layer_name(i), [])
        sums = {m.name: torch.zeros(m.in_features, dtype=torch.float64) for m in modules}

        def record(module, inputs, output, name, sums=sums):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name].add_(x.pow(2).sum(0))

        handles = [
            m.module.register_forward_hook(lambda mod, i, o, name=m.name: record(mod, i, o, name))
            for m in modules
        ]
        with torch.no_grad():
            model(ids)
        for h in handles:
            h.remove()
        for m in modules:
            weight = m.read_weight()
            score = weight.abs().double() * sums[m.name].sqrt()
            k = int(m.in_features * sparsity)
            mask = torch.zeros_like(weight, dtype=torch.bool)
            mask.scatter_(1, torch.argsort(score, dim=1)[:, :k], True)
            m.write_weight(weight.masked_fill(mask, 0))
            masks[m.name] = mask
    return masks


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_wanda_exact_row_sparsity_and_reference(architecture):
    model = make_model(architecture)
    calibration = make_token_calibration()
    reference = _reference_wanda(model, calibration, 0.5)
    report = Pruner(WandaConfig(sparsity=0.5)).prune_model(model, calibration, show_progress=False)
    masks = _masks(model)
    assert set(masks) == set(reference) == set(report.module_sparsity)
    for name, mask in masks.items():
        rows, cols = mask.shape
        assert (mask.sum(dim=1) == cols // 2).all(), name
        agreement = (mask == reference[name]).float().mean()
        assert agreement == 1.0, f"{name}: {agreement:.4f} of the mask equals the reference"
    assert report.achieved_sparsity == pytest.approx(0.5)
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 10))).logits).all()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(
    "config", [SparseGPTConfig(sparsity=0.5, block_size=32), WandaConfig(mask_structure="2:4")]
)
def test_sparsegpt_and_nm_on_every_architecture(architecture, config):
    model = make_model(architecture)
    report = Pruner(config).prune_model(model, make_token_calibration(), show_progress=False)
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.01)
    for name, mask in _masks(model).items():
        if config.nm_structure:
            kept = (~mask).reshape(mask.shape[0], -1, 4).sum(2)
            assert (kept <= 2).all(), name
    assert torch.isfinite(model(torch.randint(0, VOCAB, (1, 10))).logits).all()


def test_mwanda_with_zero_weights_equals_wanda():
    calibration = make_token_calibration()
    wanda_model, mwanda_model = make_model("llama"), make_model("llama")
    Pruner(WandaConfig(sparsity=0.6)).prune_model(wanda_model, calibration, show_progress=False)
    Pruner(
        MWandaConfig(
            sparsity=0.6,
            variance_weight=0.0,
            activation_probability_weight=0.0,
            layerwise="uniform",
            mean_compensation="none",
        )
    ).prune_model(mwanda_model, calibration, show_progress=False)
    for name, mask in _masks(wanda_model).items():
        assert torch.equal(mask, _masks(mwanda_model)[name]), name
    for (name, a), b in zip(wanda_model.named_parameters(), mwanda_model.parameters()):
        assert torch.equal(a, b), name


def test_mwanda_terms_change_masks():
    calibration = make_token_calibration()
    base, full = make_model("llama"), make_model("llama")
    Pruner(WandaConfig()).prune_model(base, calibration, show_progress=False)
    Pruner(MWandaConfig(variance_weight=2.0, activation_probability_weight=2.0)).prune_model(
        full, calibration, show_progress=False
    )
    different = sum(int((m != _masks(full)[n]).sum()) for n, m in _masks(base).items())
    assert different > 0


@pytest.mark.parametrize("rank", [0, None])
def test_closed_form_shrinkage_changes_only_the_update(rank):
    """``diagonal_dampening`` with the closed form: the first layer keeps its mask (the score does not
    change), its kept weights move less as the shrinkage grows, and a huge one leaves Wanda's weights."""
    calibration = make_token_calibration()
    original = make_model("llama")
    first_layer = [n for n, _ in original.named_parameters() if ".layers.0." in n and "proj" in n]
    dense = {n: p.detach().clone() for n, p in original.named_parameters()}
    results = {}
    for d in (0.0, 0.3, 1e6):
        model = copy.deepcopy(original)
        config = MWandaConfig(sparsity=0.5, compensation_rank=rank, diagonal_dampening=d)
        assert config.resolve().weight_update.name == "closed_form"
        Pruner(config).prune_model(model, calibration, show_progress=False)
        results[d] = {n: p.detach().clone() for n, p in model.named_parameters() if n in first_layer}
    for name in first_layer:
        masks = {d: weights[name] == 0 for d, weights in results.items()}
        assert torch.equal(masks[0.0], masks[0.3]) and torch.equal(masks[0.0], masks[1e6]), name
        wanda = dense[name].masked_fill(masks[0.0], 0.0)
        moved = {d: float((weights[name] - wanda).norm()) for d, weights in results.items()}
        assert moved[0.0] > moved[0.3] > moved[1e6], (name, moved)
        torch.testing.assert_close(results[1e6][name], wanda, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "config",
    [WandaConfig(layerwise="owl"), MWandaConfig(layerwise="cwl"), MWandaConfig(layerwise="depth")],
    ids=["owl", "cwl", "depth"],
)
def test_layerwise_schedule_bounds_and_mean(config):
    model = make_model("llama")
    report = Pruner(config).prune_model(model, make_token_calibration(), show_progress=False)
    low, high = config.sparsity - config.layerwise_range, config.sparsity + config.layerwise_range
    assert all(low - 1e-9 <= s <= high + 1e-9 for s in report.layer_sparsity)
    assert len(set(report.layer_sparsity)) > 1
    counts = [
        sum(
            report.module_shapes[n][0] * report.module_shapes[n][1]
            for n in report.module_shapes
            if f".{i}." in n
        )
        for i in range(len(report.layer_sparsity))
    ]
    mean = sum(s * c for s, c in zip(report.layer_sparsity, counts)) / sum(counts)
    assert mean == pytest.approx(config.sparsity, abs=1e-9)
    if config.layerwise == "depth":  # no signal pass: sparsity rises with depth
        assert report.layerwise_signal == []
        assert report.layer_sparsity == sorted(report.layer_sparsity)
    else:
        assert len(report.layerwise_signal) == len(report.layer_sparsity)
    # Measured per-layer sparsity follows the schedule.
    for i, target in enumerate(report.layer_sparsity):
        layer = [n for n in report.module_sparsity if f".{i}." in n]
        assert sum(report.module_sparsity[n] for n in layer) / len(layer) == pytest.approx(target, abs=0.02)


def test_same_seed_same_masks_and_text_calibration():
    tokenizer = make_tokenizer()
    config = WandaConfig(calibration_seq_len=16, samples_per_language=3, seed=7)
    models = [make_model("llama") for _ in range(3)]
    reports = [
        Pruner(config).prune_model(m, text_corpus(), tokenizer=tokenizer, show_progress=False)
        for m in models[:2]
    ]
    other = WandaConfig(calibration_seq_len=16, samples_per_language=3, seed=8)
    Pruner(other).prune_model(models[2], text_corpus(), tokenizer=tokenizer, show_progress=False)
    first, second, third = (_masks(m) for m in models)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert any(not torch.equal(first[n], third[n]) for n in first)
    assert reports[0].languages == ["en", "de", "sw"]
    assert reports[0].token_counts == {"en": 48, "de": 48, "sw": 48}


def test_padding_never_reaches_statistics():
    """Changing the token ids under padding must not change the masks."""
    calibration = make_token_calibration(n=4, seq_len=24)
    ids = torch.cat(list(calibration.values()))
    mask = torch.ones_like(ids)
    mask[:, 16:] = 0
    languages = [lang for lang, t in calibration.items() for _ in range(t.shape[0])]
    noisy = ids.clone()
    noisy[:, 16:] = torch.randint(3, VOCAB, noisy[:, 16:].shape)
    a, b = make_model("llama"), make_model("llama")
    # Right padding: attention is causal, so the non-padding tokens are unaffected by what the padding holds.
    Pruner(WandaConfig()).prune_model(a, CalibrationSet(ids, mask, languages), show_progress=False)
    Pruner(WandaConfig()).prune_model(b, CalibrationSet(noisy, mask, languages), show_progress=False)
    for name, m in _masks(a).items():
        assert torch.equal(m, _masks(b)[name]), name


def test_ignore_and_never_pruned_modules():
    model = make_model("llama")
    before = linear_weights(model)
    report = Pruner(WandaConfig(ignore=["*.mlp.down_proj"])).prune_model(
        model, make_token_calibration(), show_progress=False
    )
    after = model.state_dict()
    assert not any("down_proj" in n for n in report.module_sparsity)
    for name in before:
        if "down_proj" in name or "lm_head" in name or "embed" in name or "norm" in name:
            assert torch.equal(before[name], after[name]), name


def test_negative_calibration_prunes_features_active_on_unwanted_text():
    calibration = make_token_calibration(languages=("en",), n=6)
    negative = {"code": torch.randint(200, 320, (6, 24), generator=torch.Generator().manual_seed(3))}
    plain, penalised = make_model("llama"), make_model("llama")
    Pruner(WandaConfig()).prune_model(plain, calibration, show_progress=False)
    report = Pruner(WandaConfig()).prune_model(
        penalised, calibration, negative_calibration=negative, show_progress=False
    )
    assert report.languages == ["en"]
    assert any(not torch.equal(m, _masks(penalised)[n]) for n, m in _masks(plain).items())
    with pytest.raises(ValueError, match="not SparseGPT"):
        Pruner(SparseGPTConfig()).prune_model(make_model("llama"), calibration, negative_calibration=negative)


def test_report_contents():
    model = make_model("gemma3")
    report = Pruner(MWandaConfig(layerwise="cwl")).prune_model(
        model, make_token_calibration(), show_progress=False
    )
    data = report.to_dict()
    assert data["method"] == "mwanda" and data["config"]["layerwise"] == "cwl"
    assert set(data["timings"]) >= {
        "capture",
        "statistics",
        "pruning",
        "propagation",
        "total",
        "layerwise_signal",
    }
    assert data["token_counts"] == {"en": 96, "de": 96, "sw": 96}
    assert len(data["layer_sparsity"]) == 3
    assert data["architecture"] == "Gemma3ForCausalLM"


# -- errors: raised before any weight is touched ---------------------------------------------------------


def _assert_raises_untouched(model, exception, match, **kwargs):
    before = linear_weights(model)
    config = kwargs.pop("config", WandaConfig())
    with pytest.raises(exception, match=match):
        Pruner(config).prune_model(model, show_progress=False, **kwargs)
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


def test_error_empty_calibration():
    _assert_raises_untouched(make_model(), ValueError, "empty", calibration={})


def test_error_language_without_tokens():
    calibration = {"en": torch.randint(3, 100, (2, 8)), "de": torch.zeros(0, 8, dtype=torch.long)}
    _assert_raises_untouched(make_model(), ValueError, "'de' has no tokens", calibration=calibration)


def test_error_all_padding_language():
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.tensor([[1] * 8, [0] * 8])
    with pytest.raises(ValueError, match=r"\['de'\] have no"):
        CalibrationSet(ids, mask, ["en", "de"])


def test_error_texts_without_tokenizer():
    _assert_raises_untouched(make_model(), ValueError, "tokenizer", calibration=text_corpus())


def test_error_token_ids_out_of_vocabulary():
    _assert_raises_untouched(
        make_model(), ValueError, "token ids must lie", calibration={"en": torch.full((2, 8), VOCAB + 5)}
    )


def test_error_impossible_nm_for_model():
    _assert_raises_untouched(
        make_model(),
        ValueError,
        "divisible by 128",
        calibration=make_token_calibration(),
        config=WandaConfig(sparsity=0.5, mask_structure="64:128"),
    )


def test_error_model_without_decoder_layers():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.proj = nn.Linear(4, 4)

        def get_input_embeddings(self):
            return self.embed

    with pytest.raises(ValueError, match="could not find decoder layers"):
        Pruner(WandaConfig()).prune_model(NotADecoder(), {"en": torch.randint(0, 10, (1, 4))})


def test_error_non_finite_embeddings():
    model = make_model()
    calibration = make_token_calibration()
    with torch.no_grad():
        model.get_input_embeddings().weight[calibration["en"][0, 0]] = float("nan")
    _assert_raises_untouched(model, FloatingPointError, "NaN or infinite", calibration=calibration)


def test_non_finite_weight_in_a_later_layer_is_named_before_pruning():
    """A non-finite weight in layer 1 is found by the scan of all weights, before layer 0 is pruned."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    _assert_raises_untouched(
        model,
        ValueError,
        "weights of model.layers.1.self_attn.v_proj hold NaN",
        calibration=make_token_calibration(),
    )


def test_pruner_rejects_non_config():
    with pytest.raises(TypeError, match="WandaConfig"):
        Pruner({"sparsity": 0.5})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_error_non_integer_token_ids(dtype):
    # .long() would silently truncate 3.7 -> 3 (and turn True into 1): such ids are rejected instead.
    calibration = {"en": torch.full((2, 8), 3.7).to(dtype)}
    _assert_raises_untouched(make_model(), TypeError, "integer token ids", calibration=calibration)


def test_error_attention_mask_not_binary():
    ids = torch.randint(3, 100, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 0] = 2
    with pytest.raises(ValueError, match="only 0"):
        CalibrationSet(ids, mask, ["en", "en"])


def test_error_sequences_longer_than_position_limit():
    model = make_model("gpt2")  # learned positions: n_positions = 128
    calibration = {"en": torch.randint(3, 100, (1, 129))}
    _assert_raises_untouched(model, ValueError, "at most 128 positions", calibration=calibration)


def test_progress_bar_reaches_every_layer(monkeypatch):
    import optimum_mwanda.modeling.walk as walk

    bars = []

    class RecordingBar(walk.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(walk, "tqdm", RecordingBar)
    model = make_model("llama")
    Pruner(WandaConfig()).prune_model(model, make_token_calibration(), show_progress=True)
    pruning = [bar for bar in bars if str(bar.desc).startswith("Pruning")]
    assert len(pruning) == 1 and pruning[0].n == pruning[0].total == len(find_decoder_stack(model).layers)


def test_report_records_calibration_settings_that_applied():
    model = make_model("llama")
    report = Pruner(WandaConfig(seed=3)).prune_model(model, make_token_calibration(n=2), show_progress=False)
    # Token ids were given: the packing knobs (samples_per_language, calibration_seq_len, seed) did not apply.
    assert report.calibration_settings == {
        "seq_len": 24,
        "sequences_per_language": {"en": 2, "de": 2, "sw": 2},
    }
    texts = {lang: lines for lang, lines in text_corpus().items() if lang in ("en", "de")}
    config = WandaConfig(seed=3, samples_per_language=2, calibration_seq_len=16)
    report = Pruner(config).prune_model(
        make_model("llama"), texts, tokenizer=make_tokenizer(), show_progress=False
    )
    assert report.calibration_settings == {
        "seq_len": 16,
        "sequences_per_language": {"en": 2, "de": 2},
        "seed": 3,
    }


def test_algorithm_registry_one_object_per_method():
    from optimum_mwanda.configuration import PruningConfig
    from optimum_mwanda.methods import (
        MWandaAlgorithm,
        PruningAlgorithm,
        SparseGPTAlgorithm,
        WandaAlgorithm,
        algorithm_for,
    )

    assert type(algorithm_for(WandaConfig())) is WandaAlgorithm
    assert type(algorithm_for(MWandaConfig())) is MWandaAlgorithm
    assert type(algorithm_for(SparseGPTConfig())) is SparseGPTAlgorithm
    with pytest.raises(TypeError, match="no pruning algorithm"):
        algorithm_for(PruningConfig())
    with pytest.raises(TypeError):
        WandaAlgorithm(SparseGPTConfig())
    assert issubclass(MWandaAlgorithm, PruningAlgorithm)


@pytest.mark.parametrize("structure", ["2:4", "unstructured"])
def test_mwanda_sweep_is_sparsegpt_on_the_token_sampled_hessian(structure):
    """M-Wanda's ``weight_update="sweep"`` (the N:M default) runs SparseGPT's sweep on the Hessian of every
    ``hessian_token_stride``-th token shrunk towards its diagonal, then refines the kept weights: the same
    weights as SparseGPT with that stride, ``diagonal_dampening`` and ``refinement_steps``, and other
    weights than SparseGPT on every token, without the shrinkage or without the refinement."""
    calibration = make_token_calibration(n=8)  # 144 sampled tokens: more than the 128 inputs of down_proj
    extra = {} if structure == "2:4" else {"weight_update": "sweep", "layerwise": "uniform"}
    config = MWandaConfig(mask_structure=structure, hessian_token_stride=4, **extra)
    assert config.resolve().weight_update.name == "sweep"
    assert config.diagonal_dampening == MWANDA_DEFAULTS.sweep_shrinkage > 0
    steps = config.refinement_steps
    assert steps == MWANDA_DEFAULTS.refinement_steps > 0
    references = {
        "sampled": (4, config.diagonal_dampening, steps),
        "full": (1, config.diagonal_dampening, steps),
        "unshrunk": (4, 0.0, steps),
        "unrefined": (4, config.diagonal_dampening, 0),
    }
    models = {name: make_model("llama") for name in ("mwanda", *references)}
    Pruner(config).prune_model(models["mwanda"], calibration, show_progress=False)
    for name, (stride, diagonal, refinement) in references.items():
        reference = SparseGPTConfig(
            mask_structure=structure,
            hessian_token_stride=stride,
            diagonal_dampening=diagonal,
            refinement_steps=refinement,
        )
        Pruner(reference).prune_model(models[name], calibration, show_progress=False)
    for (name, a), b in zip(models["mwanda"].named_parameters(), models["sampled"].parameters()):
        assert torch.equal(a, b), name
    for other in ("full", "unshrunk", "unrefined"):
        pairs = zip(models["mwanda"].parameters(), models[other].parameters())
        assert any(not torch.equal(a, c) for a, c in pairs), other
    if structure == "2:4":
        for name, mask in _masks(models["mwanda"]).items():
            assert ((~mask).reshape(mask.shape[0], -1, 4).sum(-1) == 2).all(), name
    negative = {"code": torch.randint(200, 320, (2, 24), generator=torch.Generator().manual_seed(3))}
    with pytest.raises(ValueError, match='weight_update="sweep"'):
        Pruner(config).prune_model(make_model("llama"), calibration, negative_calibration=negative)


def test_mwanda_sweep_sizes_its_token_sample_from_the_calibration(monkeypatch):
    """``hessian_token_stride=None`` (the default) resolves per shared-input group from the run's
    calibration tokens: 576 tokens give inputs of 64 features every 4th token (the cap) and of 128 every 2nd
    (at least 1.75 sampled tokens per input), so no group is left rank-deficient; the card names the
    strides. The 24 sequences are multiplied in groups of 3 (``sequence_group_for``)."""
    import optimum_mwanda.methods.mwanda as mwanda_module
    from optimum_mwanda.hub import create_model_card

    created: dict[int, int] = {}
    groups: set[int] = set()
    original = mwanda_module.HessianStatistics

    def recording(in_features, num_languages, device="cpu", token_stride=1, **options):
        created[in_features] = token_stride
        groups.add(options["sequence_group"])
        return original(in_features, num_languages, device=device, token_stride=token_stride, **options)

    monkeypatch.setattr(mwanda_module, "HessianStatistics", recording)
    calibration = make_token_calibration(n=8)  # 3 languages x 8 x 24 = 576 tokens
    config = MWandaConfig(mask_structure="2:4")
    assert config.hessian_token_stride is None
    pruner = Pruner(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in particular no "fewer tokens than inputs" warning
        report = pruner.prune_model(make_model("llama"), calibration, show_progress=False)
    assert created == {64: 4, 128: 2}
    assert groups == {3}
    card = create_model_card(report).text
    assert "auto: 4 for 64-feature inputs; 2 for 128-feature inputs" in card
    # An explicit stride is used as given.
    created.clear()
    Pruner(MWandaConfig(mask_structure="2:4", hessian_token_stride=3)).prune_model(
        make_model("llama"), calibration, show_progress=False
    )
    assert created == {64: 3, 128: 3}


def test_sweep_warns_when_the_hessian_saw_fewer_tokens_than_inputs():
    calibration = make_token_calibration(n=1)
    with pytest.warns(UserWarning, match="lower hessian_token_stride"):
        Pruner(SparseGPTConfig(hessian_token_stride=24)).prune_model(
            make_model("llama"), calibration, show_progress=False
        )
