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
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
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
