"""Resumable runs: a pruning subprocess killed mid-run resumes to the masks of an uninterrupted run."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import fault_injection as fi
import pytest
import torch
from tiny_models import TINY_DECODER, linear_weights, make_model, make_token_calibration
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda.modeling import read_parameter
from optimum_mwanda.resume import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    ResumeCheckpoint,
    model_weights_digest,
)

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
    config = LlamaConfig(**TINY_DECODER, num_hidden_layers=NUM_LAYERS, vocab_size=320)
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
                completed = json.loads(state_file.read_text())["state"]["completed_layers"]
                if completed >= 2:
                    break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = json.loads(state_file.read_text())["state"]["completed_layers"]
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


# -- weights in the fingerprint, checksums, files that are not ours ----------------------------------------
def _partial_checkpoint(method: str, checkpoint_dir, model=None) -> None:
    """A run that faults right before layer 2's file is opened: state.json, layer_0/1 and hidden states."""
    with fi.io_steps(fi.raise_before("open", ".tmp-layer_2.safetensors")), pytest.raises(fi.InjectedFault):
        fi.prune(method, checkpoint_dir, model)
    assert json.loads((checkpoint_dir / "state.json").read_text())["state"]["completed_layers"] == 2


def test_checkpoint_of_another_model_with_the_same_architecture_is_refused(tmp_path):
    checkpoint_dir = tmp_path / "checkpoint"
    _partial_checkpoint("wanda", checkpoint_dir, make_model("llama", seed=0))
    other = make_model("llama", seed=1)  # same config, other weights
    before = linear_weights(other)
    with pytest.raises(CheckpointMismatchError, match="model weights"):
        fi.prune("wanda", checkpoint_dir, other)
    assert all(torch.equal(before[n], w) for n, w in linear_weights(other).items())
    # One weight changed is enough: the digest is a full hash.
    changed = make_model("llama", seed=0)
    with torch.no_grad():
        changed.model.layers[1].mlp.up_proj.weight[3, 5] += 1e-3
    with pytest.raises(CheckpointMismatchError, match="model weights"):
        fi.prune("wanda", checkpoint_dir, changed)
    # The same weights in another dtype digest differently too (they would prune differently).
    assert model_weights_digest(make_model("llama").to(torch.bfloat16)) != model_weights_digest(
        make_model("llama")
    )


def test_offloaded_model_resumes_a_checkpoint_written_in_memory(dense_dir, tmp_path):
    """The digest reads offloaded weights through the offload accessors: a disk-offloaded load of the same
    checkpoint is the same model, and resumes to the masks of an uninterrupted in-memory run."""
    calibration = make_token_calibration(n=2, seq_len=16)
    config = WandaConfig()
    checkpoint_dir = tmp_path / "checkpoint"
    with fi.io_steps(fi.raise_before("open", ".tmp-layer_3.safetensors")), pytest.raises(fi.InjectedFault):
        model = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
        Pruner(config).prune_model(model, calibration, show_progress=False, checkpoint_dir=checkpoint_dir)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"model.layers.{i}": "disk" if i % 2 == 0 else "cpu" for i in range(NUM_LAYERS)})
    offloaded = AutoModelForCausalLM.from_pretrained(
        dense_dir, device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert offloaded.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    report = Pruner(config).prune_model(
        offloaded, calibration, show_progress=False, checkpoint_dir=checkpoint_dir
    )
    assert report.resumed_from_layer == 3
    reference = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    Pruner(config).prune_model(reference, calibration, show_progress=False)
    for i in range(NUM_LAYERS):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            got = offloaded.get_submodule(f"model.layers.{i}.{name}")
            expected = reference.get_submodule(f"model.layers.{i}.{name}").weight
            weight = read_parameter(got, "weight")
            assert torch.equal(weight == 0, expected == 0), f"layer {i} {name}: masks differ"
            torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6)


def _flip(path, offset: int) -> None:
    # In place, not truncate-and-rewrite: ext4 flushes a truncated-and-rewritten file on close (slow).
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))


def test_flipped_byte_in_any_checkpoint_file_is_refused(tmp_path):
    source = tmp_path / "checkpoint"
    _partial_checkpoint("mwanda", source)
    names = sorted(p.name for p in source.iterdir())
    assert names == ["hidden_3.safetensors", "layer_0.safetensors", "layer_1.safetensors", "state.json"]
    fingerprint = json.loads((source / "state.json").read_text())["fingerprint"]
    dense = linear_weights(make_model("llama"))

    # End to end through prune_model, for each kind of file: a clear error and the model untouched.
    for name in names:
        for where in ("start", "middle", "end"):
            damaged = tmp_path / f"{name}-{where}"
            shutil.copytree(source, damaged)
            size = (damaged / name).stat().st_size
            _flip(damaged / name, {"start": 3, "middle": size // 2, "end": size - 2}[where])
            model = make_model("llama")
            with pytest.raises(CheckpointCorruptError, match="damaged"):
                fi.prune("mwanda", damaged, model)
            assert all(torch.equal(dense[n], w) for n, w in linear_weights(model).items()), (name, where)
    # Every single byte of state.json, and every 97th byte of the data files (each flip is refused).
    damaged = tmp_path / "flip"
    shutil.copytree(source, damaged)
    for name in names:
        size = (source / name).stat().st_size
        for offset in range(0, size, 1 if name == "state.json" else 97):
            _flip(damaged / name, offset)
            with pytest.raises(CheckpointCorruptError):
                ResumeCheckpoint(damaged, fingerprint).load_state()
            _flip(damaged / name, offset)  # back
    # A missing or truncated file.
    for name in names:
        damaged = tmp_path / f"{name}-missing"
        shutil.copytree(source, damaged)
        (damaged / name).unlink()
        with pytest.raises(CheckpointError, match="missing|holds no state.json"):
            fi.prune("mwanda", damaged)
        damaged = tmp_path / f"{name}-truncated"
        shutil.copytree(source, damaged)
        (damaged / name).write_bytes((damaged / name).read_bytes()[:-7])
        with pytest.raises(CheckpointCorruptError, match="damaged"):
            fi.prune("mwanda", damaged)
    # The untouched copy still resumes to the uninterrupted result.
    model, report = fi.prune("mwanda", source)
    expected, _ = fi.prune("mwanda", None)
    assert report.resumed_from_layer == 2
    assert all(torch.equal(expected.state_dict()[n], w) for n, w in model.state_dict().items())


def test_files_that_are_not_ours_are_kept(tmp_path):
    checkpoint_dir = tmp_path / "checkpoint"
    _partial_checkpoint("wanda", checkpoint_dir)
    foreign = {
        "notes.txt": b"mine",
        "layer_0.safetensors.bak": b"backup",
        "hidden.safetensors": b"not ours in this format",
        ".tmp-notes": b"also mine",
        "eval/results.json": b"{}",
    }
    for name, data in foreign.items():
        (checkpoint_dir / name).parent.mkdir(exist_ok=True)
        (checkpoint_dir / name).write_bytes(data)
    _, report = fi.prune("wanda", checkpoint_dir)
    assert report.resumed_from_layer == 2
    for name, data in foreign.items():
        assert (checkpoint_dir / name).read_bytes() == data, name
    ours = {p.name for p in checkpoint_dir.iterdir()} - {"notes.txt", "layer_0.safetensors.bak", "eval"}
    assert ours == {"state.json", "hidden.safetensors", ".tmp-notes"} | {
        f"layer_{i}.safetensors" for i in range(3)
    }


def test_checkpoint_of_an_older_format_is_refused(tmp_path):
    checkpoint_dir = tmp_path / "checkpoint"
    checkpoint_dir.mkdir()
    (checkpoint_dir / "state.json").write_text(json.dumps({"format_version": 1, "fingerprint": "x"}))
    (checkpoint_dir / "hidden.safetensors").write_bytes(b"old")
    with pytest.raises(CheckpointMismatchError, match="incompatible version"):
        fi.prune("wanda", checkpoint_dir)
    assert (checkpoint_dir / "hidden.safetensors").read_bytes() == b"old"


def test_layer_before_first_state_is_a_programming_error(tmp_path):
    checkpoint = ResumeCheckpoint(tmp_path / "checkpoint", "fingerprint")
    assert checkpoint.load_state() is None
    with pytest.raises(RuntimeError, match="save_progress must be called before"):
        checkpoint.save_layer(0, {"w": torch.zeros(2)})
    assert not (tmp_path / "checkpoint").exists()
