"""End to end on the real demo model (Gemma 3 270M): slow, deselected by ``-m "not slow"``.

A small budget (2 languages x 2 sequences x 128 tokens, one 128-token evaluation window per language) keeps
each test to about a minute on 2 CPU cores; it still walks every real code path: the converted demo
checkpoint, the bundled corpus, the pruner on Gemma 3's layers, chunked perplexity with logit soft-capping,
and the example script that the README runs.
"""

import json
import math

import pytest
from repo_scripts import load_script

pytestmark = pytest.mark.slow

LANGUAGES = ["en", "sw"]


@pytest.fixture(scope="module")
def demo():
    torch = pytest.importorskip("torch")
    from optimum_mwanda import demo as demo_module

    try:
        demo_module.demo_model_path()
    except ImportError as err:  # neither the demo package nor a converted cache
        pytest.skip(str(err))
    model, tokenizer = demo_module.load_demo_model(dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    yield model, tokenizer
    model.load_state_dict(state)


@pytest.mark.parametrize("method", ["mwanda", "wanda"])
def test_prune_real_model_small_budget(demo, method):
    import torch

    from optimum_mwanda import MWandaConfig, Pruner, WandaConfig, default_calibration, load_bundled_corpus
    from optimum_mwanda.evaluation import evaluate_perplexity

    model, tokenizer = demo
    heldout = load_bundled_corpus("heldout", LANGUAGES)
    before = evaluate_perplexity(model, tokenizer, heldout, seq_len=128, max_windows=1, show_progress=False)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = default_calibration(tokenizer, languages=LANGUAGES, samples_per_language=2, seq_len=128)
    config_class = MWandaConfig if method == "mwanda" else WandaConfig
    try:
        report = Pruner(config_class(sparsity=0.5)).prune_model(model, calibration, show_progress=False)
        after = evaluate_perplexity(
            model, tokenizer, heldout, seq_len=128, max_windows=1, show_progress=False
        )
        # Every linear module of every decoder layer is pruned to its layer's target (M-Wanda's default
        # depth schedule gives each layer its own), row by row; the parameter-weighted mean is the target.
        assert len(report.module_sparsity) == 7 * model.config.num_hidden_layers
        if method == "wanda":
            assert report.layer_sparsity == [0.5] * model.config.num_hidden_layers
        else:
            assert report.layer_sparsity == sorted(report.layer_sparsity) and report.layer_sparsity[0] < 0.5
        for name, fraction in report.module_sparsity.items():
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert fraction == pytest.approx(report.layer_sparsity[layer], abs=0.01), name
            weight = model.get_submodule(name).weight
            assert float((weight == 0).float().mean()) == pytest.approx(fraction, abs=1e-6)
        assert report.achieved_sparsity == pytest.approx(0.5, abs=0.005)
        # Embeddings / LM head are never pruned.
        assert torch.equal(model.get_input_embeddings().weight, original["model.embed_tokens.weight"])
        assert report.token_counts == {"en": 256, "sw": 256}
        for lang in LANGUAGES:
            assert math.isfinite(before[lang]) and math.isfinite(after[lang])
            assert 1.0 < before[lang] < after[lang]  # half the weights gone: worse, but still a model
    finally:
        model.load_state_dict(original)


def test_example_script_end_to_end(demo, tmp_path):
    example = load_script("examples/prune_and_evaluate.py")
    out = tmp_path / "pruned"
    result = example.main(
        [
            "--languages",
            *LANGUAGES,
            "--samples-per-language",
            "2",
            "--seq-len",
            "128",
            "--eval-seq-len",
            "128",
            "--max-windows",
            "1",
            "--output-dir",
            str(out),
        ]
    )
    assert list(result["perplexity"]) == ["dense", "Wanda", "M-Wanda"]
    for column in result["perplexity"].values():
        assert set(column) == set(LANGUAGES) and all(math.isfinite(v) for v in column.values())
    config = json.loads((out / "config.json").read_text())
    assert config["sparsity_config"]["method"] == "mwanda"
    assert (out / "README.md").is_file() and (out / "pruning_report.json").is_file()

    from safetensors.torch import load_file

    proj = [
        (name, tensor)
        for shard in sorted(out.glob("*.safetensors"))
        for name, tensor in load_file(str(shard)).items()
        if name.endswith("mlp.down_proj.weight")
    ]
    targets = json.loads((out / "pruning_report.json").read_text())["layer_sparsity"]
    assert len(proj) == len(targets)
    for name, tensor in proj:
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert float((tensor == 0).float().mean()) == pytest.approx(targets[layer], abs=0.01), name
