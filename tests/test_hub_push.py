"""Pushing pruned models to a local Hub-compatible server (tests/hub_server.py), and loading them back."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import READ_TOKEN, WRITE_TOKEN
from hub_fixtures import decoder_linears, make_report, prune_by_magnitude, tiny_llama, tiny_tokenizer
from huggingface_hub import ModelCard
from tiny_models import make_model, make_token_calibration, make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_mwanda import Pruner, PruningReport, WandaConfig, load_pruned_model, verify_sparsity
from optimum_mwanda.hub import HubAuthenticationError, HubPermissionError, HubPushError, push_pruned_model

EXPECTED_FILES = {
    ".gitattributes",
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "pruning_report.json",
    "sparsity_per_layer.png",
    "tokenizer.json",
    "tokenizer_config.json",
}
COMMIT = r"/api/models/.+/commit/main"


@pytest.fixture(scope="module")
def pruned():
    model = tiny_llama(seed=11)
    prune_by_magnitude(model, 0.5)
    return model, make_report(model, ["en", "sw"])


def _push(model, report, repo_id, **kwargs):
    kwargs.setdefault("token", WRITE_TOKEN)
    kwargs.setdefault("retry_delay", 0.01)
    return push_pruned_model(model, repo_id, report, **kwargs)


def _assert_same_weights(expected, actual):
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        assert torch.equal(tensor, got[name]), name


def test_pruner_push_then_load_back_from_the_hub(hub):
    model = make_model("llama", seed=3)
    pruner = Pruner(WandaConfig(sparsity=0.5))
    pruner.prune_model(model, make_token_calibration(("en", "de", "sw")), show_progress=False)
    evals = {
        "before": {"en": 300.0, "de": 310.0, "sw": 320.0},
        "after": {"en": 330.0, "de": 350.0, "sw": 370.0},
    }
    info = pruner.push_to_hub(
        model, "alice/llama-wanda", tokenizer=make_tokenizer(), eval_results=evals, token=WRITE_TOKEN
    )

    commits = hub.commits("alice/llama-wanda")
    assert len(commits) == 2 and commits[-1].oid == info.oid  # repo creation, then ONE commit with everything
    # The evaluation results travel with the checkpoint; the local manifest does not.
    assert set(commits[-1].files) == EXPECTED_FILES | {"eval_results.json"}

    loaded = AutoModelForCausalLM.from_pretrained("alice/llama-wanda")
    _assert_same_weights(model, loaded)
    measured = verify_sparsity(loaded).module_sparsity
    assert measured == pytest.approx(pruner.report.module_sparsity)
    for name, module in decoder_linears(loaded).items():
        assert torch.equal(module.weight == 0, model.get_submodule(name).weight == 0)
    entry = loaded.config.sparsity_config
    assert entry["method"] == "wanda" and entry["calibration_languages"] == ["en", "de", "sw"]
    assert entry["calibration_token_counts"] == pruner.report.token_counts
    assert AutoTokenizer.from_pretrained("alice/llama-wanda")("hello")["input_ids"]

    card = ModelCard.load("alice/llama-wanda")
    assert card.data.language == ["en", "de", "sw"]
    assert {"pruned", "sparse", "wanda", "multilingual"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"
    assert {r.dataset_config: r.metric_value for r in card.data.eval_results} == evals["after"]
    assert "![Sparsity per decoder layer](sparsity_per_layer.png)" in card.text
    report = PruningReport.from_dict(json.loads(hub.files("alice/llama-wanda")["pruning_report.json"]))
    assert report.module_sparsity == pruner.report.module_sparsity


def test_compressed_push_restores_exactly(hub, pruned):
    model, report = pruned
    _push(model, report, "mwanda-org/tiny-packed", tokenizer=tiny_tokenizer(), compressed=True, private=True)
    assert hub.repos["mwanda-org/tiny-packed"].private
    files = hub.files("mwanda-org/tiny-packed")
    assert "model.sparse.safetensors" in files and "model.safetensors" not in files
    restored = load_pruned_model("mwanda-org/tiny-packed", token=WRITE_TOKEN)
    _assert_same_weights(model, restored)


def test_a_500_on_the_commit_is_retried(hub, pruned):
    model, report = pruned
    hub.fail("POST", COMMIT, 500, times=2)
    _push(model, report, "alice/retry-500")
    statuses = [status for method, path, status in hub.log if method == "POST" and "/commit/" in path]
    assert statuses == [500, 500, 200]
    assert len(hub.commits("alice/retry-500")) == 2
    _assert_same_weights(model, AutoModelForCausalLM.from_pretrained("alice/retry-500"))


def test_a_dropped_connection_is_retried(hub, pruned):
    model, report = pruned
    hub.fail("POST", COMMIT, "drop")
    hub.fail("POST", r"/api/repos/create", "drop")
    _push(model, report, "alice/retry-drop")
    assert ("POST", "/api/models/alice/retry-drop/commit/main", "drop") in hub.log
    assert len(hub.commits("alice/retry-drop")) == 2
    _assert_same_weights(model, load_pruned_model("alice/retry-drop"))  # dense: straight from_pretrained


def test_a_commit_whose_answer_was_lost_is_not_duplicated(hub, pruned):
    model, report = pruned
    hub.fail("POST", COMMIT, "drop_after")
    info = _push(model, report, "alice/lost-answer")
    commits = hub.commits("alice/lost-answer")
    assert len(commits) == 2  # the retry found every file unchanged and committed nothing
    assert info.oid == commits[-1].oid


def test_persistent_server_errors_fail_without_a_partial_commit(hub, pruned):
    model, report = pruned
    hub.fail("POST", COMMIT, 503, times=10)
    with pytest.raises(HubPushError, match="after 3 attempts"):
        _push(model, report, "alice/down", max_retries=2)
    assert [c.message for c in hub.commits("alice/down")] == ["initial commit"]
    assert set(hub.files("alice/down")) == {".gitattributes"}


def test_invalid_repo_id_fails_before_any_request(hub, pruned):
    model, report = pruned
    for bad in ("alice/bad name", "alice/x/y", "alice/--x", "a" * 97):
        with pytest.raises(ValueError, match="invalid repo_id"):
            _push(model, report, bad)
    assert hub.log == []


def test_invalid_language_code_fails_before_any_request(hub, pruned):
    model, _ = pruned
    with pytest.raises(ValueError, match="'qq'"):
        _push(model, make_report(model, ["en", "qq"]), "alice/bad-language")
    with pytest.raises(ValueError, match="'zz'"):
        _push(model, make_report(model, ["en"]), "alice/bad-language", eval_results={"after": {"zz": 2.0}})
    assert hub.log == []


def test_missing_token_fails_before_any_request(hub, pruned, monkeypatch):
    model, report = pruned
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubAuthenticationError, match="no Hugging Face token"):
        push_pruned_model(model, "alice/no-token", report)
    assert hub.log == []


def test_rejected_token_is_an_authentication_error(hub, pruned):
    model, report = pruned
    with pytest.raises(HubAuthenticationError, match="401"):
        _push(model, report, "alice/bad-token", token="hf_not_a_real_token")
    assert "alice/bad-token" not in hub.repos


@pytest.mark.parametrize(
    ("token", "repo_id"), [(READ_TOKEN, "bob/read-only"), (WRITE_TOKEN, "bob/not-alices")]
)
def test_missing_write_permission_is_a_permission_error(hub, pruned, token, repo_id):
    model, report = pruned
    with pytest.raises(HubPermissionError, match="403"):
        _push(model, report, repo_id, token=token)
    assert repo_id not in hub.repos


def test_pushing_again_updates_the_repo(hub, pruned):
    model, report = pruned
    _push(model, report, "alice/updated")
    other = tiny_llama(seed=12)
    prune_by_magnitude(other, 0.6)
    _push(other, make_report(other, ["en"], sparsity=0.6), "alice/updated", commit_message="60% sparse")
    commits = hub.commits("alice/updated")
    assert [c.message for c in commits][1:] == [commits[1].message, "60% sparse"]
    loaded = AutoModelForCausalLM.from_pretrained("alice/updated")
    _assert_same_weights(other, loaded)
    assert loaded.config.sparsity_config["target_sparsity"] == 0.6


def test_push_access_is_checked_with_one_question(hub):
    from optimum_mwanda.hub.push import check_push_access

    assert check_push_access("plain-name", WRITE_TOKEN) == "alice/plain-name"  # the token's own namespace
    assert check_push_access("mwanda-org/x", WRITE_TOKEN) == "mwanda-org/x"  # one of its organisations
    with pytest.raises(HubAuthenticationError, match="401"):
        check_push_access("alice/x", "hf_not_a_real_token")
    with pytest.raises(HubPermissionError, match="read-only"):
        check_push_access("bob/x", READ_TOKEN)
    with pytest.raises(HubPermissionError, match="namespace 'someone-else'"):
        check_push_access("someone-else/x", WRITE_TOKEN)
    assert {path for _, path, _ in hub.log} == {"/api/whoami-v2"} and not hub.repos
