"""Checks that run before any weight changes (optimum_mwanda.preflight and the pruner's validation phase):
peft models, ignore typos, language keys, unbounded ranks, unloaded or non-finite weights, size strings,
unwritable folders. Each test fails on a pruner that finds the problem late, or not at all."""

from __future__ import annotations

import pytest
import torch
from permissions import unwritable
from tiny_models import make_model, make_token_calibration, make_tokenizer, text_corpus

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig, evaluate_perplexity
from optimum_mwanda.preflight import check_writable_folder, parse_memory_size


def _linear_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.dim() == 2}


def _assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)


# -- peft (LoRA) models -------------------------------------------------------------------------------------
def _lora_model(seed: int = 0):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(make_model("llama", seed=seed), config)


def test_peft_model_prunes_the_base_weights_never_the_adapters():
    model = _lora_model()
    adapters = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    assert adapters
    report = Pruner(WandaConfig(sparsity=0.5)).prune_model(
        model, make_token_calibration(), show_progress=False
    )
    # The adapters are untouched; modules are named as in the plain model, adapters never listed.
    state = model.state_dict()
    for key, value in adapters.items():
        assert torch.equal(state[key], value), key
    assert "model.layers.0.self_attn.q_proj" in report.module_sparsity
    assert not any("lora" in name or "base_layer" in name for name in report.module_sparsity)
    assert all(value == pytest.approx(0.5) for value in report.module_sparsity.values())
    # Merged, q_proj holds exactly the target zeros (the fresh adapters' update B @ A is zero).
    merged = model.merge_and_unload()
    for layer in merged.model.layers:
        for weight in (
            layer.self_attn.q_proj.weight,
            layer.self_attn.v_proj.weight,
            layer.mlp.down_proj.weight,
        ):
            assert float((weight == 0).float().mean()) == pytest.approx(0.5)


def test_peft_ignore_patterns_use_the_plain_module_names():
    model = _lora_model()
    before = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    report = Pruner(WandaConfig(sparsity=0.5, ignore=["*.q_proj"])).prune_model(
        model, make_token_calibration(), show_progress=False
    )
    assert not any(name.endswith("q_proj") for name in report.module_sparsity)
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, before)


@pytest.mark.parametrize("state", ["trained", "merged"])
def test_peft_model_with_trained_or_merged_adapters_is_refused_untouched(state):
    model = _lora_model()
    q_proj = model.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        q_proj.lora_B["default"].weight.normal_()
    if state == "merged":
        q_proj.merge()
    before = _linear_weights(model)
    with pytest.raises(ValueError, match="merge_and_reprune") as error:
        Pruner(WandaConfig(sparsity=0.5)).prune_model(model, make_token_calibration(), show_progress=False)
    assert ("trained" if state == "trained" else "merged into the base weights") in str(error.value)
    assert "model.layers.1.self_attn.q_proj" in str(error.value)
    _assert_unchanged(model, before)


# -- ignore patterns ----------------------------------------------------------------------------------------
def test_an_ignore_pattern_that_matches_nothing_is_refused_with_close_names():
    model = make_model("llama")
    before = _linear_weights(model)
    with pytest.raises(ValueError, match=r"'\*\.o_prj' \(did you mean '\*\.o_proj'") as error:
        Pruner(WandaConfig(ignore=["*.o_proj", "*.o_prj"])).prune_model(
            model, make_token_calibration(), show_progress=False
        )
    assert "'*.o_proj'" not in str(error.value).split("(did you mean")[0]  # the valid pattern is not blamed
    _assert_unchanged(model, before)
    # Patterns naming modules outside the pruned set (never pruned anyway) and substrings are fine.
    report = Pruner(WandaConfig(ignore=["lm_head", "layers.0."])).prune_model(
        model, make_token_calibration(), show_progress=False
    )
    assert not any(".layers.0." in name for name in report.module_sparsity)


# -- one rule for language keys -----------------------------------------------------------------------------
@pytest.mark.parametrize("second", ["EN", "eng"])
def test_token_ids_and_texts_refuse_one_language_given_twice(second):
    model = make_model("llama")
    before = _linear_weights(model)
    calibration = make_token_calibration(("en", "de"))
    tokens = {"en": calibration["en"], second: calibration["de"]}
    with pytest.raises(ValueError, match=rf"language 'en' is given twice \(as 'en' and '{second}'\)"):
        Pruner(WandaConfig()).prune_model(model, tokens, show_progress=False)
    texts = text_corpus()
    with pytest.raises(ValueError, match=rf"language 'en' is given twice \(as 'en' and '{second}'\)"):
        Pruner(WandaConfig(samples_per_language=1, calibration_seq_len=16)).prune_model(
            model, {"en": texts["en"], second: texts["de"]}, tokenizer=make_tokenizer(), show_progress=False
        )
    _assert_unchanged(model, before)


# -- M-Wanda's compensation rank ----------------------------------------------------------------------------
def test_compensation_rank_is_bounded_by_the_input_width():
    model = make_model("llama")
    before = _linear_weights(model)
    for rank in (10**6, 65):
        with pytest.raises(
            ValueError, match=r"compensation_rank=\d+ exceeds the input width .* at most"
        ) as err:
            Pruner(MWandaConfig(compensation_rank=rank)).prune_model(
                model, make_token_calibration(), show_progress=False
            )
        assert "(64)" in str(err.value)  # the narrowest pruned input of the tiny Llama
    _assert_unchanged(model, before)
    # The bound itself is allowed.
    report = Pruner(MWandaConfig(compensation_rank=64)).prune_model(
        model, make_token_calibration(), show_progress=False
    )
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.02)
    # The default rank (32) is capped at narrower widths, never refused.
    narrow = type(model)(type(model.config)(hidden_size=16, intermediate_size=32, num_attention_heads=2,
        num_key_value_heads=1, num_hidden_layers=2, vocab_size=320))  # fmt: skip
    report = Pruner(MWandaConfig()).prune_model(narrow, make_token_calibration(), show_progress=False)
    assert report.config.weight_update.rank > 16


# -- weights ------------------------------------------------------------------------------------------------
def test_a_meta_device_model_is_refused_clearly():
    with torch.device("meta"):
        model = type(make_model("llama"))(make_model("llama").config)
    with pytest.raises(ValueError, match="weights are not loaded .* meta device"):
        Pruner(WandaConfig()).prune_model(model, make_token_calibration(), show_progress=False)


def test_a_non_finite_weight_in_the_last_layer_stops_the_run_before_any_layer_runs():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[3, 5] = float("nan")
    before = _linear_weights(model)
    calls = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=r"weights of model\.layers\.2\.mlp\.down_proj hold NaN"):
        Pruner(WandaConfig()).prune_model(model, make_token_calibration(), show_progress=False)
    handle.remove()
    assert calls == [], "the first decoder layer ran before the weights were scanned"
    _assert_unchanged(model, before)


def test_a_failure_mid_walk_restores_the_pruned_layers():
    model = make_model("llama")
    before = _linear_weights(model)

    def fail(*_):
        raise RuntimeError("simulated failure in layer 1")

    # Layer 1 runs for the first time after layer 0 is pruned (statistics of layer 1).
    handle = model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        Pruner(WandaConfig()).prune_model(model, make_token_calibration(), show_progress=False)
    handle.remove()
    _assert_unchanged(model, before)


# -- sizes and folders --------------------------------------------------------------------------------------
def test_activations_max_memory_takes_size_strings():
    assert parse_memory_size("8GB", "x") == 8 * 10**9
    assert parse_memory_size("8GiB", "x") == 8 * 2**30
    assert parse_memory_size("512MB", "x") == 512 * 10**6
    assert parse_memory_size(1024, "x") == 1024 and parse_memory_size("0", "x") == 0
    for bad in ("lots", "-5", "8 parsecs"):
        with pytest.raises(ValueError, match="is not a size"):
            parse_memory_size(bad, "activations_max_memory")
    with pytest.raises(TypeError):
        parse_memory_size(1.5, "activations_max_memory")
    # A string budget spills like the same number of bytes: identical weights.
    results = []
    for budget in ("1KB", 1000, "8GB"):
        model = make_model("llama")
        Pruner(WandaConfig()).prune_model(
            model, make_token_calibration(), show_progress=False, activations_max_memory=budget
        )
        results.append(_linear_weights(model))
    for key, value in results[0].items():
        assert torch.equal(value, results[1][key]) and torch.equal(value, results[2][key]), key


def test_an_unwritable_checkpoint_dir_is_refused_before_anything(tmp_path):
    model = make_model("llama")
    before = _linear_weights(model)
    with unwritable(tmp_path / "read-only") as folder:
        for target in (folder, folder / "new" / "checkpoint"):
            with pytest.raises(PermissionError, match="no write permission"):
                Pruner(WandaConfig()).prune_model(
                    model, make_token_calibration(), show_progress=False, checkpoint_dir=target
                )
        assert list(folder.iterdir()) == []  # nothing staged, nothing created
    _assert_unchanged(model, before)


def test_check_writable_folder_for_staged_saves(tmp_path):
    (tmp_path / "parent" / "out").mkdir(parents=True)
    with unwritable(tmp_path / "parent") as parent:
        # The folder itself would do, but an atomic save stages beside it, in the unwritable parent.
        with pytest.raises(PermissionError, match="staged beside the folder"):
            check_writable_folder(parent / "out", "save_directory", staged_beside=True)
        with pytest.raises(PermissionError):
            check_writable_folder(parent / "new" / "out", "save_directory", staged_beside=True)
    assert (
        check_writable_folder(tmp_path / "a" / "b", "save_directory", staged_beside=True)
        == tmp_path / "a" / "b"
    )


# -- evaluation ---------------------------------------------------------------------------------------------
def test_evaluate_perplexity_refuses_windows_longer_than_the_positions():
    model = make_model("gpt2")  # n_positions=128
    with pytest.raises(ValueError, match="256 tokens but this model takes at most 128 positions"):
        evaluate_perplexity(
            model, make_tokenizer(), {"en": text_corpus()["en"]}, seq_len=256, show_progress=False
        )


def test_sparsegpt_ignore_typo_is_refused_too():
    with pytest.raises(ValueError, match="match no module"):
        Pruner(SparseGPTConfig(ignore=["mlp.gate_prj"])).prune_model(
            make_model("llama"), make_token_calibration(), show_progress=False
        )


def test_pruner_save_into_an_unwritable_parent_is_refused_before_writing(tmp_path):
    model = make_model("llama")
    pruner = Pruner(WandaConfig())
    pruner.prune_model(model, make_token_calibration(), show_progress=False)
    (tmp_path / "read-only" / "out").mkdir(parents=True)
    with unwritable(tmp_path / "read-only") as folder:
        with pytest.raises(PermissionError, match="staged beside the folder"):
            pruner.save_pretrained(model, folder / "out")
        assert [p.name for p in folder.iterdir()] == ["out"] and not any((folder / "out").iterdir())
