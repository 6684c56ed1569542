"""Accelerate device maps: CPU offload and disk offload prune to the same masks as the in-memory model."""

import pytest
import torch
from accelerate import cpu_offload
from tiny_models import VOCAB, make_model, make_token_calibration
from transformers import AutoModelForCausalLM

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda.modeling import find_decoder_stack, find_prunable_linears


def _weights(model) -> dict[str, torch.Tensor]:
    stack = find_decoder_stack(model)
    return {
        m.name: m.read_weight().clone()
        for i, layer in enumerate(stack.layers)
        for m in find_prunable_linears(layer, stack.layer_name(i), [])
    }


def _disk_device_map(num_layers: int) -> dict[str, str]:
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    for i in range(num_layers):
        device_map[f"model.layers.{i}"] = "disk" if i % 2 == 0 else "cpu"
    return device_map


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    make_model("llama").save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "config",
    [WandaConfig(), SparseGPTConfig(block_size=32), MWandaConfig(layerwise="cwl")],
    ids=lambda c: c.method,
)
def test_offloaded_models_prune_like_in_memory(checkpoint, tmp_path, config):
    calibration = make_token_calibration()
    probe = torch.randint(3, VOCAB, (2, 12))

    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    Pruner(config).prune_model(reference, calibration, show_progress=False)
    expected = _weights(reference)
    expected_logits = reference(probe).logits

    # CPU offload: parameters on meta, values in a CPU weights map.
    cpu_model = cpu_offload(AutoModelForCausalLM.from_pretrained(checkpoint).eval(), execution_device="cpu")
    assert cpu_model.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    # Disk offload through transformers' own device map loading (half the layers on disk).
    disk_model = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map=_disk_device_map(3), offload_folder=str(tmp_path / "offload")
    ).eval()
    assert disk_model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    source_checkpoint = (checkpoint / "model.safetensors").read_bytes()

    for model in (cpu_model, disk_model):
        Pruner(config).prune_model(model, calibration, show_progress=False)
        got = _weights(model)
        for name, weight in expected.items():
            assert torch.equal(got[name] == 0, weight == 0), f"{name}: masks differ"
            torch.testing.assert_close(got[name], weight, rtol=1e-5, atol=1e-6)
        # The pruned weights are really in effect in the forward pass.
        torch.testing.assert_close(model(probe).logits, expected_logits, rtol=1e-4, atol=1e-5)

    # save_pretrained of the disk-offloaded model writes the pruned weights; the source file is untouched.
    disk_model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, weight in _weights(reloaded).items():
        assert torch.equal(weight == 0, expected[name] == 0), name
    assert (checkpoint / "model.safetensors").read_bytes() == source_checkpoint


def test_model_larger_than_max_memory_prunes_with_disk_offload(checkpoint, tmp_path):
    calibration = make_token_calibration()
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    Pruner(WandaConfig()).prune_model(reference, calibration, show_progress=False)
    # A CPU budget below the model's size: from_pretrained puts what does not fit on disk.
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, device_map="auto", max_memory={"cpu": "250KB"}, offload_folder=str(tmp_path / "off")
    ).eval()
    assert "disk" in set(model.hf_device_map.values())
    Pruner(WandaConfig()).prune_model(model, calibration, show_progress=False)
    for name, weight in _weights(reference).items():
        assert torch.equal(_weights(model)[name] == 0, weight == 0), name


def test_activations_spill_to_disk_with_identical_masks():
    calibration = make_token_calibration()
    in_memory, spilled = make_model("llama"), make_model("llama")
    Pruner(SparseGPTConfig(block_size=32)).prune_model(in_memory, calibration, show_progress=False)
    # A budget of one batch: the other batches of every layer's inputs go to disk and back.
    one_batch = 4 * 24 * 64 * 4
    Pruner(SparseGPTConfig(block_size=32)).prune_model(
        spilled, calibration, show_progress=False, activations_device="cpu", activations_max_memory=one_batch
    )
    for name, weight in _weights(in_memory).items():
        assert torch.equal(_weights(spilled)[name], weight), name


def test_activation_store_budget(tmp_path):
    from optimum_mwanda.modeling import ActivationStore

    tensors = [torch.full((2, 3), float(i)) for i in range(4)]
    store = ActivationStore(tensors, device="cpu", max_memory_bytes=2 * 6 * 4, spill_dir=tmp_path)
    assert store.bytes_in_memory == 48 and store.batches_on_disk == 2
    assert [float(store[i][0, 0]) for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
    store[3] = torch.zeros(2, 3)
    assert torch.equal(store[3], torch.zeros(2, 3))
    store.close()
    assert not any(tmp_path.iterdir())
