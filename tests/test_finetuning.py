"""Sparse fine-tuning: pruned weights stay exactly zero through Trainer, custom loops and LoRA merges."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from repo_scripts import load_script
from tiny_models import VOCAB, make_model, make_token_calibration, make_tokenizer, text_corpus
from transformers import Trainer, TrainingArguments

from optimum_mwanda import (
    Pruner,
    SparsityKeeper,
    WandaConfig,
    load_pruned_model,
    merge_and_reprune,
    preserve_sparsity,
    verify_sparsity,
)
from optimum_mwanda.training import SparsityPreservingCallback, find_pruned_modules


@functools.cache
def _pruned_state(architecture: str) -> dict[str, torch.Tensor]:
    model = make_model(architecture)
    Pruner(WandaConfig(sparsity=0.5)).prune_model(model, make_token_calibration(), show_progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pruned_model(architecture: str = "llama") -> torch.nn.Module:
    model = make_model(architecture)
    model.load_state_dict(_pruned_state(architecture))
    return model


def zero_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Exact zeros of every 2-D parameter that has any (independent of the package's module discovery:
    randomly initialised weights are never exactly zero, pruned ones are)."""
    masks = {}
    for name, param in model.named_parameters():
        if param.dim() == 2 and bool((param == 0).any()):
            masks[name] = (param == 0).detach().clone()
    return masks


def revived_fraction(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Share of the originally-zero weights that are no longer exactly zero."""
    params = dict(model.named_parameters())
    revived = sum(int((params[name].detach()[mask] != 0).sum()) for name, mask in masks.items())
    return revived / sum(int(mask.sum()) for mask in masks.values())


def kept_changed_fraction(model, before: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float:
    """Share of the kept (non-pruned) weights that moved: proves that training happened."""
    params = dict(model.named_parameters())
    changed = total = 0
    for name, mask in masks.items():
        keep = ~mask
        changed += int((params[name].detach()[keep] != before[name][keep]).sum())
        total += int(keep.sum())
    return changed / total


def token_dataset(n: int = 8, seq_len: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, 200, (n, seq_len), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in rows]


def train(model, tmp_path, callbacks=(), steps: int = 3) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        warmup_steps=0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=list(callbacks))
    trainer.train()
    return trainer


def lm_loss(model, seed: int = 1) -> torch.Tensor:
    batch = torch.stack([row["input_ids"] for row in token_dataset(2, seed=seed)])
    return model(input_ids=batch, labels=batch).loss


def pruned_grads_nonzero(model, masks: dict[str, torch.Tensor]) -> bool:
    """Backward once and report whether any pruned weight gets a non-zero gradient (i.e. no hook masks it)."""
    model.zero_grad()
    lm_loss(model).backward()
    params = dict(model.named_parameters())
    return any(bool((params[name].grad[mask] != 0).any()) for name, mask in masks.items())


# -- transformers.Trainer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_trainer_callback_keeps_every_pruned_weight_at_zero(architecture, tmp_path):
    model = pruned_model(architecture)
    masks = zero_masks(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sparsity_before = verify_sparsity(model).overall
    assert 0.45 < sparsity_before < 0.55

    callback = SparsityPreservingCallback()
    train(model.train(), tmp_path, callbacks=[callback])

    assert revived_fraction(model, masks) == 0.0
    assert zero_masks(model).keys() == masks.keys()
    for name, mask in zero_masks(model).items():
        assert torch.equal(mask, masks[name])  # and no kept weight became zero either
    assert verify_sparsity(model).overall == sparsity_before
    assert kept_changed_fraction(model, before, masks) > 0.9
    # the keeper recorded exactly the pruned modules' zeros (GPT-2 Conv1D in its own [in, out] layout)
    assert callback.keeper.num_pruned == sum(int(m.sum()) for m in masks.values())
    # hooks are gone after training: the model is an ordinary model again
    assert pruned_grads_nonzero(model, masks)


def test_without_the_callback_training_revives_pruned_weights(tmp_path):
    model = pruned_model("llama")
    masks = zero_masks(model)
    train(model.train(), tmp_path)
    assert revived_fraction(model, masks) > 0.5
    assert verify_sparsity(model).overall < 0.1


def test_callback_built_for_another_model_is_refused(tmp_path):
    callback = SparsityPreservingCallback(pruned_model("llama"))
    with pytest.raises(ValueError, match="different model"):
        train(pruned_model("llama").train(), tmp_path, callbacks=[callback])


# -- custom loops ---------------------------------------------------------------------------------------------
def test_gradient_hooks_alone_stop_adamw_from_moving_pruned_weights():
    model = pruned_model("llama").train()
    masks = zero_masks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    keeper = SparsityKeeper(model)  # gradient hooks on, no apply() below
    for seed in range(3):
        lm_loss(model, seed).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert keeper.count_revived() == 0
    assert revived_fraction(model, masks) == 0.0
    keeper.remove_hooks()
    assert pruned_grads_nonzero(model, masks)


def test_apply_is_the_guarantee_when_gradients_are_not_masked():
    model = pruned_model("llama").train()
    masks = zero_masks(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    keeper = SparsityKeeper(model, zero_gradients=False)
    lm_loss(model).backward()
    optimizer.step()
    assert keeper.count_revived() > 0.5 * keeper.num_pruned  # the optimizer did move them
    keeper.apply()
    assert keeper.count_revived() == 0
    assert revived_fraction(model, masks) == 0.0


def test_preserve_sparsity_with_optimizer_hook_on_gpt2_conv1d():
    model = pruned_model("gpt2").train()
    masks = zero_masks(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with preserve_sparsity(model, optimizer, zero_gradients=False) as keeper:
        assert set(keeper.module_names) == set(verify_sparsity(model).module_sparsity)
        for seed in range(3):
            lm_loss(model, seed).backward()
            optimizer.step()  # the post-step hook re-zeroes here
            assert revived_fraction(model, masks) == 0.0
            optimizer.zero_grad()
    assert kept_changed_fraction(model, before, masks) > 0.9
    # the optimizer hook is removed on exit: a further step revives pruned weights
    lm_loss(model).backward()
    optimizer.step()
    assert revived_fraction(model, masks) > 0.5


def test_preserve_sparsity_with_manual_apply_and_exit_on_error():
    model = pruned_model("qwen2").train()
    masks = zero_masks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with preserve_sparsity(model, zero_gradients=False) as keeper:
            lm_loss(model).backward()
            optimizer.step()
            assert keeper.count_revived() > 0
            keeper.apply()
            assert keeper.count_revived() == 0
            lm_loss(model).backward()
            optimizer.step()
            raise RuntimeError("boom")
    assert revived_fraction(model, masks) == 0.0  # the exit applied the masks even on the error


def test_ignore_patterns_recorded_in_sparsity_config_are_honoured():
    model = pruned_model("llama")
    everything = SparsityKeeper(model, zero_gradients=False).module_names
    assert any(".mlp." in name for name in everything)
    model.config.sparsity_config = {"ignore": ["*.mlp.*"]}
    keeper = SparsityKeeper(model, zero_gradients=False)
    assert keeper.module_names == [name for name in everything if ".mlp." not in name]
    assert SparsityKeeper(model, ignore=[], zero_gradients=False).module_names == everything


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        SparsityKeeper("not a model")
    with pytest.raises(ValueError, match="not pruned"):
        SparsityKeeper(make_model("llama"))
    with pytest.raises(ValueError, match="not pruned"):
        SparsityPreservingCallback(make_model("llama"))
    with pytest.raises(TypeError, match="ignore"):
        SparsityKeeper(pruned_model("llama"), ignore="*.mlp.*")
    with pytest.raises(ValueError, match="decoder layers"):
        SparsityKeeper(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    keeper = SparsityKeeper(pruned_model("llama"), zero_gradients=False)
    with pytest.raises(TypeError, match="Optimizer"):
        keeper.attach_optimizer(object())
    with pytest.raises(TypeError, match="peft model"):
        merge_and_reprune(pruned_model("llama"))


# -- LoRA (peft) ----------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_training_and_merge_and_reprune(tmp_path):
    peft = pytest.importorskip("peft")
    base = pruned_model("llama")
    plain_names = list(find_pruned_modules(base))
    masks = zero_masks(base)
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]
    )
    peft_model = peft.get_peft_model(base, config)
    callback = SparsityPreservingCallback()
    train(peft_model, tmp_path, callbacks=[callback])

    # the keeper masks the wrapped base layers under their plain names, never the adapters (lora_B starts
    # at zero and must be free to train)
    assert callback.keeper.module_names == plain_names
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(bool((p != 0).any()) for p in lora_b)

    unmerged_copy = copy.deepcopy(peft_model)
    merged = merge_and_reprune(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert revived_fraction(merged, masks) == 0.0
    assert zero_masks(merged).keys() == masks.keys()
    # the adapters were merged: the kept weights of the targeted modules changed, the others did not
    moved = kept_changed_fraction(merged, before, {k: v for k, v in masks.items() if "q_proj" in k})
    untouched = kept_changed_fraction(merged, before, {k: v for k, v in masks.items() if "k_proj" in k})
    assert moved > 0.9 and untouched == 0.0

    # a plain merge is what destroys sparsity
    plain_merge = unmerged_copy.merge_and_unload()
    targeted = {k: v for k, v in masks.items() if any(t in k for t in ("q_proj", "v_proj", "down_proj"))}
    assert revived_fraction(plain_merge, targeted) > 0.9


# -- the examples -------------------------------------------------------------------------------------------
def _load_example(name: str):
    return load_script(f"examples/{name}.py", f"example_{name}")


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A dense tiny Llama and a Wanda-pruned copy saved by the Pruner, both with the tiny tokenizer."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    tokenizer = make_tokenizer()
    dense = make_model("llama")
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    pruner = Pruner(WandaConfig(sparsity=0.5))
    pruned = make_model("llama")
    pruner.prune_model(pruned, make_token_calibration(), show_progress=False)
    pruner.save_pretrained(pruned, root / "pruned", tokenizer=tokenizer)
    return root / "dense", root / "pruned"


def test_finetune_example_keeps_the_masks_and_saves_a_loadable_checkpoint(tiny_folders, tmp_path):
    example = _load_example("finetune_sparse")
    _, pruned = tiny_folders
    out = tmp_path / "finetuned"
    result = example.main(
        [
            "--pruned", str(pruned), "--language", "sw", "--eval-languages", "sw", "de",
            "--steps", "2", "--block-size", "32", "--eval-seq-len", "48", "--max-windows", "1",
            "--lr", "1e-2", "--output-dir", str(out), "--json", str(tmp_path / "ft.json"),
        ]
    )  # fmt: skip
    assert result["revived"] == 0
    assert result["sparsity_after"] == result["sparsity_before"] > 0.45
    assert set(result["perplexity"]) == {"pruned", "fine-tuned"}
    assert list(result["perplexity"]["fine-tuned"]) == ["sw", "de"]
    assert result["perplexity"]["fine-tuned"] != result["perplexity"]["pruned"]  # it trained
    assert json.loads((tmp_path / "ft.json").read_text())["revived"] == 0
    reloaded = load_pruned_model(out)
    original = load_pruned_model(pruned)
    assert zero_masks(reloaded).keys() == zero_masks(original).keys()
    for name, mask in zero_masks(original).items():
        assert torch.equal(zero_masks(reloaded)[name], mask)
    assert json.loads((out / "config.json").read_text())["sparsity_config"]["method"] == "wanda"


def test_pack_blocks_cuts_full_blocks_with_bos():
    example = _load_example("finetune_sparse")
    assert example.pack_blocks(list(range(10, 20)), 4, bos_token_id=1) == [
        [1, 10, 11, 12],
        [1, 13, 14, 15],
        [1, 16, 17, 18],
    ]
    assert example.pack_blocks(list(range(5)), 2, bos_token_id=None) == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="block_size"):
        example.pack_blocks([1, 2], 1, None)


def test_evaluate_example_table_json_and_data_folder(tiny_folders, tmp_path):
    example = _load_example("evaluate_pruned")
    dense, pruned = tiny_folders
    data = tmp_path / "data"
    data.mkdir()
    texts = text_corpus()
    for lang in ("en", "sw"):
        (data / f"{lang}.txt").write_text("\n".join(texts[lang]), encoding="utf-8")
    out = example.main(
        [str(dense), str(pruned), "--data", str(data), "--seq-len", "32", "--max-windows", "2",
         "--json", str(tmp_path / "eval.json")]
    )  # fmt: skip
    models = out["models"]
    assert list(models) == ["dense", "pruned"]
    assert models["dense"]["sparsity"] == 0.0 and 0.45 < models["pruned"]["sparsity"] < 0.55
    for entry in models.values():
        assert list(entry["perplexity"]) == ["en", "sw"]
        assert all(1 < ppl < 10 * VOCAB for ppl in entry["perplexity"].values())
        assert all(
            tokens == 62 for tokens in entry["scored_tokens"].values()
        )  # 2 windows of 31 scored tokens
    assert models["dense"]["perplexity"] != models["pruned"]["perplexity"]
    assert json.loads((tmp_path / "eval.json").read_text())["models"]["pruned"][
        "perplexity"
    ] == pytest.approx(models["pruned"]["perplexity"])


def test_evaluate_example_without_lm_eval_exits_2_before_loading(monkeypatch, capsys):
    example = _load_example("evaluate_pruned")
    monkeypatch.setattr(example, "lm_eval_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        example.main(["/nonexistent/model", "--lm-eval-tasks", "xnli,xstorycloze"])
    assert exit_info.value.code == 2
    assert "lm-evaluation-harness is not installed" in capsys.readouterr().err


def test_lm_eval_results_are_flattened_per_task():
    example = _load_example("evaluate_pruned")
    results = {
        "results": {
            "xnli_sw": {"alias": "xnli_sw", "acc,none": 0.41, "acc_stderr,none": 0.01},
            "xstorycloze_sw": {"acc,none": 0.55, "acc_norm,strict": 0.6, "samples": True},
        }
    }
    assert example.flatten_lm_eval_results(results) == {
        "xnli_sw": {"acc": 0.41, "acc_stderr": 0.01},
        "xstorycloze_sw": {"acc": 0.55, "acc_norm (strict)": 0.6},
    }
    assert example.parse_tasks(" xnli, ,xstorycloze,xnli ") == ["xnli", "xstorycloze"]
