"""Save/reload of pruned models: dense and compressed formats, metadata, offloaded models, atomic writes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hub_fixtures import (
    OFFLOAD_LAYER_1,
    decoder_linears,
    make_report,
    prune_by_magnitude,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)
from safetensors import safe_open
from tiny_models import make_model, make_token_calibration
from transformers import AutoModelForCausalLM

from optimum_mwanda import Pruner, PruningReport, WandaConfig, load_pruned_model, verify_sparsity
from optimum_mwanda.hub import save_pruned_model
from optimum_mwanda.hub.atomic import MANIFEST_NAME
from optimum_mwanda.hub.compression import PackedTensor, pack_bitmask, packing_pays_off, unpack_bitmask
from optimum_mwanda.modeling import find_decoder_stack, find_prunable_linears


@pytest.fixture(scope="module")
def pruned_llama():
    model = tiny_llama(seed=1)
    prune_by_magnitude(model, 0.5)
    return model, make_report(model, ["en", "sw", "yo"])


def _assert_same_weights(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


def _zero_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight == 0 for name, module in decoder_linears(model).items()}


# -- pure packing ------------------------------------------------------------------------------------------
def test_pack_unpack_is_exact_and_counts_bits():
    torch.manual_seed(0)
    weight = torch.randn(7, 13)  # 91 entries: the last packed byte is padding
    weight[weight.abs() < 0.6] = 0
    packed = pack_bitmask(weight)
    assert packed.bitmask.dtype == torch.uint8 and packed.bitmask.numel() == (91 + 7) // 8
    assert packed.values.numel() == int(torch.count_nonzero(weight))
    assert torch.equal(unpack_bitmask(packed), weight)


def test_unpack_rejects_a_bitmask_that_disagrees_with_the_values():
    packed = pack_bitmask(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    broken = PackedTensor(packed.bitmask, packed.values[:1], packed.shape)
    with pytest.raises(ValueError, match="bitmask marks 2 non-zeros but 1"):
        unpack_bitmask(broken)


def test_packing_pays_off_only_for_sparse_2d_float_tensors():
    dense = torch.randn(16, 16)
    half = dense.clone()
    half[:, ::2] = 0
    assert packing_pays_off(half)
    assert not packing_pays_off(dense)
    assert not packing_pays_off(half.reshape(-1))  # 1-D: kept as is
    assert not packing_pays_off(torch.zeros(4, 4, dtype=torch.int64))


# -- dense format ------------------------------------------------------------------------------------------
def test_dense_checkpoint_loads_with_plain_transformers_and_keeps_zeros(pruned_llama, tmp_path):
    model, report = pruned_llama
    folder = save_pruned_model(model, tmp_path / "ckpt", report, tokenizer=tiny_tokenizer())
    names = set(os.listdir(folder))
    assert {
        "config.json",
        "model.safetensors",
        "pruning_report.json",
        "README.md",
        "sparsity_per_layer.png",
    } <= names
    # The only hidden file is the manifest of what the package wrote (no staging leftovers).
    assert "tokenizer.json" in names and [n for n in names if n.startswith(".")] == [MANIFEST_NAME]

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    _assert_same_weights(model, loaded)
    masks = _zero_masks(model)
    for name, module in decoder_linears(loaded).items():
        assert torch.equal(module.weight == 0, masks[name]), name
    assert verify_sparsity(loaded).overall == pytest.approx(0.5, abs=1e-6)

    entry = loaded.config.sparsity_config
    assert entry["method"] == "mwanda"
    assert entry["target_sparsity"] == 0.5
    assert entry["achieved_sparsity"] == pytest.approx(report.achieved_sparsity, abs=1e-6)
    assert entry["mask_structure"] == "unstructured"
    assert entry["layer_sparsity"] == [0.5, 0.5]
    assert entry["achieved_layer_sparsity"] == pytest.approx([0.5, 0.5])
    assert entry["calibration_languages"] == ["en", "sw", "yo"]
    assert entry["calibration_token_counts"] == report.token_counts
    assert entry["checkpoint_format"] == "dense"
    assert entry["optimum_mwanda_version"]

    saved_report = PruningReport.from_dict(json.loads((folder / "pruning_report.json").read_text()))
    assert saved_report == report


def test_sparsity_config_survives_a_plain_load_save_round_trip(pruned_llama, tmp_path):
    model, report = pruned_llama
    first = save_pruned_model(model, tmp_path / "first", report, model_card=False)
    AutoModelForCausalLM.from_pretrained(first).save_pretrained(tmp_path / "second")
    before = json.loads((first / "config.json").read_text())["sparsity_config"]
    after = json.loads((tmp_path / "second" / "config.json").read_text())["sparsity_config"]
    assert after == before


def test_save_rejects_bad_input_before_writing(pruned_llama, tmp_path):
    model, report = pruned_llama
    target = tmp_path / "never"
    with pytest.raises(TypeError, match="PruningReport"):
        save_pruned_model(model, target, {"method": "wanda"})
    with pytest.raises(ValueError, match="safetensors"):
        save_pruned_model(model, target, report, safe_serialization=False)
    with pytest.raises(ValueError, match="eval_results"):
        save_pruned_model(model, target, report, eval_results={"during": {"en": 3.0}})
    with pytest.raises(ValueError, match="'xx'"):
        save_pruned_model(model, target, report, eval_results={"after": {"xx": 3.0}})
    assert not target.exists()
    assert os.listdir(tmp_path) == []


# -- compressed format -------------------------------------------------------------------------------------
def test_compressed_round_trip_is_exact_and_smaller(pruned_llama, tmp_path):
    model, report = pruned_llama
    dense = save_pruned_model(model, tmp_path / "dense", report, model_card=False)
    packed = save_pruned_model(model, tmp_path / "packed", report, compressed=True)
    assert not (packed / "model.safetensors").exists()
    dense_size = (dense / "model.safetensors").stat().st_size
    packed_size = (packed / "model.sparse.safetensors").stat().st_size
    # Embeddings and LM head stay dense; the 50%-sparse decoder weights shrink to ~53%.
    assert packed_size < 0.75 * dense_size

    with safe_open(str(packed / "model.sparse.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["format"] == "optimum-mwanda-bitmask"
    assert "model.layers.0.mlp.down_proj.weight.bitmask" in keys
    assert "model.embed_tokens.weight" in keys  # dense tensors stored as they are
    entry = json.loads((packed / "config.json").read_text())["sparsity_config"]
    assert entry["checkpoint_format"] == "optimum-mwanda-bitmask"
    assert entry["sparse_files"] == ["model.sparse.safetensors"]
    assert "bitmask format" in (packed / "README.md").read_text()

    restored = load_pruned_model(packed)
    _assert_same_weights(model, restored)
    assert restored.config.sparsity_config["checkpoint_format"] == "dense"
    assert restored.name_or_path == str(packed)


def test_plain_transformers_cannot_load_the_compressed_format(pruned_llama, tmp_path):
    model, report = pruned_llama
    packed = save_pruned_model(model, tmp_path / "packed", report, compressed=True, model_card=False)
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(packed)


def test_compressed_sharded_gpt2_with_tied_embeddings_round_trips(tmp_path):
    model = tiny_gpt2(seed=2)
    prune_by_magnitude(model, 0.5)
    report = make_report(model, ["de"], method="wanda")
    packed = save_pruned_model(model, tmp_path / "gpt2", report, compressed=True, max_shard_size="100KB")
    sparse_files = sorted(p.name for p in packed.glob("*.sparse.safetensors"))
    assert len(sparse_files) > 1 and (packed / "model.sparse.index.json").exists()
    assert not list(packed.glob("model.safetensors*"))  # no index that would mislead transformers
    restored = load_pruned_model(packed)
    _assert_same_weights(model, restored)
    assert restored.lm_head.weight.data_ptr() == restored.transformer.wte.weight.data_ptr()


def test_load_pruned_model_errors_are_clear(pruned_llama, tmp_path):
    model, report = pruned_llama
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pruned_model(tmp_path)
    with pytest.raises(ValueError, match="neither a local folder nor a valid Hub repo id"):
        load_pruned_model("not a//repo")
    packed = save_pruned_model(model, tmp_path / "packed", report, compressed=True, model_card=False)
    (packed / "model.sparse.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks model.sparse.safetensors"):
        load_pruned_model(packed)


def test_reloaded_dense_model_can_be_saved_compressed_again(pruned_llama, tmp_path):
    model, report = pruned_llama
    packed = save_pruned_model(model, tmp_path / "a", report, compressed=True, model_card=False)
    again = save_pruned_model(load_pruned_model(packed), tmp_path / "b", report, model_card=False)
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(again))


# -- offloaded models --------------------------------------------------------------------------------------
def test_disk_offloaded_model_saves_its_pruned_weights(pruned_llama, tmp_path):
    model, report = pruned_llama
    source = save_pruned_model(model, tmp_path / "source", report, model_card=False)
    offloaded = AutoModelForCausalLM.from_pretrained(
        source, device_map=OFFLOAD_LAYER_1, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    # Verification reads the offloaded weights back from disk.
    measured = verify_sparsity(offloaded)
    assert measured.module_sparsity["model.layers.1.mlp.down_proj"] == pytest.approx(0.5)

    with pytest.raises(ValueError, match="reads its weights from"):
        save_pruned_model(offloaded, source, report)  # would delete the files the model reads
    dense = save_pruned_model(offloaded, tmp_path / "resaved", report, model_card=False)
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(dense))
    packed = save_pruned_model(
        offloaded, tmp_path / "resaved-packed", report, compressed=True, model_card=False
    )
    _assert_same_weights(model, load_pruned_model(packed))


def test_pruner_on_a_disk_offloaded_model_saves_the_pruned_weights(tmp_path):
    source = tmp_path / "dense"
    make_model("llama", seed=4).save_pretrained(source)
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    device_map.update({f"model.layers.{i}": "disk" if i != 1 else "cpu" for i in range(3)})
    model = AutoModelForCausalLM.from_pretrained(
        source, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    pruner = Pruner(WandaConfig(sparsity=0.5))
    report = pruner.prune_model(model, make_token_calibration(), show_progress=False)
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"

    folder = pruner.save_pretrained(model, tmp_path / "pruned", compressed=True)
    restored = load_pruned_model(folder)
    assert verify_sparsity(restored).module_sparsity == pytest.approx(report.module_sparsity)
    assert restored.config.sparsity_config["achieved_sparsity"] == pytest.approx(report.achieved_sparsity)
    measured = verify_sparsity(model)  # the offloaded model itself, read back from its offload storage
    assert measured.module_sparsity == pytest.approx(report.module_sparsity)
    stack = find_decoder_stack(model)
    for i, layer in enumerate(stack.layers):
        for linear in find_prunable_linears(layer, stack.layer_name(i), []):
            assert torch.equal(restored.get_submodule(linear.name).weight, linear.read_weight()), linear.name


def test_compressed_checkpoint_loads_offloaded(pruned_llama, tmp_path):
    model, report = pruned_llama
    packed = save_pruned_model(model, tmp_path / "packed", report, compressed=True, model_card=False)
    restored = load_pruned_model(packed, device_map=OFFLOAD_LAYER_1, offload_folder=str(tmp_path / "offload"))
    assert restored.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.allclose(restored(ids).logits, model(ids).logits, atol=1e-5)


# -- atomic writes -----------------------------------------------------------------------------------------
class _Boom(RuntimeError):
    pass


def _raise(*args, **kwargs):
    raise _Boom("interrupted")


def test_interrupted_first_save_leaves_nothing(pruned_llama, tmp_path, monkeypatch):
    model, report = pruned_llama
    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(tokenizer, "save_pretrained", _raise)
    with pytest.raises(_Boom):
        save_pruned_model(model, tmp_path / "ckpt", report, tokenizer=tokenizer)
    assert os.listdir(tmp_path) == []  # neither the target nor a staging folder


def test_interrupted_overwrite_keeps_the_old_checkpoint_intact(pruned_llama, tmp_path, monkeypatch):
    model, report = pruned_llama
    target = save_pruned_model(model, tmp_path / "ckpt", report)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    other = tiny_llama(seed=7)
    prune_by_magnitude(other, 0.6)
    import transformers.modeling_utils as modeling_utils

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:  # a truncated file, then the failure
            handle.write(b"\x00" * 64)
        raise _Boom("disk full")

    monkeypatch.setattr(modeling_utils, "safe_save_file", half_written)
    with pytest.raises(_Boom):
        save_pruned_model(other, target, make_report(other))
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained(target))


def test_overwrite_replaces_the_whole_folder(pruned_llama, tmp_path):
    model, report = pruned_llama
    target = save_pruned_model(model, tmp_path / "ckpt", report)
    save_pruned_model(model, target, report, compressed=True, model_card=False)
    names = set(os.listdir(target))
    assert "model.sparse.safetensors" in names
    assert "model.safetensors" not in names and "README.md" not in names  # nothing left from the old save
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_swap_restores_the_old_folder(pruned_llama, tmp_path, monkeypatch):
    model, report = pruned_llama
    target = save_pruned_model(model, tmp_path / "ckpt", report, model_card=False)
    before = sorted(os.listdir(target))
    import optimum_mwanda.hub.atomic as atomic

    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # moving the new folder in
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="rename failed"):
        save_pruned_model(model, target, report, compressed=True, model_card=False)
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(pruned_llama, tmp_path):
    model, report = pruned_llama
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="holds files but no saved model"):
        save_pruned_model(model, tmp_path, report)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_a_flipped_byte_in_a_compressed_file_is_a_clear_error(pruned_llama, tmp_path):
    model, report = pruned_llama
    target = save_pruned_model(model, tmp_path / "ckpt", report, compressed=True, model_card=False)
    sparse = target / "model.sparse.safetensors"
    pristine = sparse.read_bytes()
    entry = json.loads((target / "config.json").read_text())["sparsity_config"]
    assert set(entry["sparse_files_sha256"]) == {"model.sparse.safetensors"}
    # Header, metadata, bitmasks and values: positions spread over the whole file.
    positions = sorted(
        {0, 3, 8, 20, 100, len(pristine) - 1, *range(0, len(pristine), max(1, len(pristine) // 40))}
    )
    for position in positions:
        corrupt = bytearray(pristine)
        corrupt[position] ^= 0x10
        sparse.write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match="is corrupt"):
            load_pruned_model(target)
    sparse.write_bytes(pristine)
    _assert_same_weights(model, load_pruned_model(target))
    print(f"{len(positions)} flipped bytes, all refused")
