"""Resumable runs: a pruning subprocess killed mid-run resumes to the masks of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tiny_models import linear_weights, make_token_calibration
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig
from optimum_mwanda.resume import CheckpointMismatchError

NUM_LAYERS = 6

CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from transformers import AutoModelForCausalLM
    from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig

    model_dir, calibration_file, checkpoint_dir, method = sys.argv[1:5]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # Slow every decoder-layer call down so that the parent can kill this process between layers.
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    config = MWandaConfig(layerwise="cwl") if method == "mwanda" else SparseGPTConfig(block_size=32)
    Pruner(config).prune_model(model, torch.load(calibration_file), show_progress=False,
                               checkpoint_dir=checkpoint_dir)
    print("finished")
    """
)


def _config(method):
    return MWandaConfig(layerwise="cwl") if method == "mwanda" else SparseGPTConfig(block_size=32)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
    )
    path = tmp_path_factory.mktemp("dense6")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["mwanda", "sparsegpt"])
def test_killed_run_resumes_to_identical_masks(dense_dir, tmp_path, method):
    calibration = make_token_calibration(n=8)
    calibration_file = tmp_path / "calibration.pt"
    torch.save(calibration, calibration_file)
    checkpoint_dir = tmp_path / "checkpoint"
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    child = subprocess.Popen(
        [sys.executable, str(script), str(dense_dir), str(calibration_file), str(checkpoint_dir), method],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    state_file = checkpoint_dir / "state.json"
    deadline = time.monotonic() + 120
    completed = 0
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if state_file.exists():
                completed = json.loads(state_file.read_text())["completed_layers"]
                if completed >= 2:
                    break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = json.loads(state_file.read_text())["completed_layers"]
    assert 2 <= killed_at < NUM_LAYERS

    resumed = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    report = Pruner(_config(method)).prune_model(
        resumed, calibration, show_progress=False, checkpoint_dir=checkpoint_dir
    )
    assert report.resumed_from_layer == killed_at
    uninterrupted = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    reference = Pruner(_config(method)).prune_model(uninterrupted, calibration, show_progress=False)

    got, expected = linear_weights(resumed), linear_weights(uninterrupted)
    for name, weight in expected.items():
        assert torch.equal(got[name] == 0, weight == 0), f"{name}: masks differ"
        torch.testing.assert_close(got[name], weight)
    assert report.layer_sparsity == reference.layer_sparsity
    assert report.module_sparsity == pytest.approx(reference.module_sparsity)

    # A finished checkpoint resumes to the end at once.
    again = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    final = Pruner(_config(method)).prune_model(
        again, calibration, show_progress=False, checkpoint_dir=checkpoint_dir
    )
    assert final.resumed_from_layer == NUM_LAYERS
    assert all(torch.equal(linear_weights(again)[n], w) for n, w in got.items())


def test_checkpoint_of_another_run_is_refused(dense_dir, tmp_path):
    calibration = make_token_calibration()
    checkpoint_dir = tmp_path / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    Pruner(MWandaConfig()).prune_model(model, calibration, show_progress=False, checkpoint_dir=checkpoint_dir)

    other = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    before = linear_weights(other)
    with pytest.raises(CheckpointMismatchError, match="different arguments"):
        Pruner(MWandaConfig(sparsity=0.6)).prune_model(
            other, calibration, show_progress=False, checkpoint_dir=checkpoint_dir
        )
    assert all(torch.equal(before[n], w) for n, w in linear_weights(other).items())

    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointMismatchError, match="not empty"):
        Pruner(MWandaConfig()).prune_model(
            other, calibration, show_progress=False, checkpoint_dir=tmp_path / "unrelated"
        )
