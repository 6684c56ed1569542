"""Per-language perplexity, the offline evaluate metric and the calibration-language sweep (tiny models)."""

import math
import struct
import warnings

import pytest
import torch
from tiny_models import make_model, make_tokenizer, text_corpus

from optimum_mwanda import WandaConfig, build_calibration, evaluate_perplexity
from optimum_mwanda.evaluation import MultilingualPerplexity, SweepResult, calibration_language_sweep
from optimum_mwanda.evaluation.loss import nll_from_logits, summed_nll_chunked, summed_nll_full
from optimum_mwanda.evaluation.windows import IGNORE_INDEX, plan_windows, window_batch
from optimum_mwanda.modeling import input_device
from optimum_mwanda.pruner import Pruner

TEXTS = {
    "en": [f"Line {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(6)],
    "de": [f"Zeile {i}: der schnelle braune Fuchs springt über den faulen Hund {i}." for i in range(4)],
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


def _stream(tokenizer, texts, separator="\n\n"):
    return torch.tensor(tokenizer(separator.join(texts), add_special_tokens=False)["input_ids"])


def _direct_ppl(model, windows):
    """exp of the scored-token-weighted mean of plain ``model(labels=...).loss`` over (input, labels) pairs."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in windows:
            n = int((labels[1:] != IGNORE_INDEX).sum())
            total += model(input_ids=ids[None], labels=labels[None]).loss.item() * n
            count += n
    return math.exp(total / count), count


# -- windows ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bos", [True, False])
@pytest.mark.parametrize(
    "num_tokens,seq_len,stride", [(50, 8, None), (50, 8, 3), (7, 8, None), (64, 9, 8), (33, 2, 1)]
)
def test_windows_score_every_token_once(num_tokens, seq_len, stride, with_bos):
    spans = plan_windows(num_tokens, seq_len, stride, with_bos)
    capacity = seq_len - 1 if with_bos else seq_len
    step = stride or capacity
    counts = [0] * num_tokens
    for i, span in enumerate(spans):
        assert span.begin == i * step  # windows start every `stride` tokens
        assert 0 < span.end - span.begin <= capacity
        assert span.begin + (0 if with_bos else 1) <= span.score_from < span.end
        for t in range(span.score_from, span.end):
            counts[t] += 1
    assert spans[-1].end == num_tokens
    if with_bos or stride is not None and stride < capacity:
        # With BOS (or overlap) every token but possibly the very first one has context and is scored once.
        first = 0 if with_bos else 1
        assert counts[first:] == [1] * (num_tokens - first)
    else:
        # Non-overlapping without BOS: the first token of each window is context only.
        assert all(c <= 1 for c in counts) and sum(counts) == num_tokens - len(spans)


def test_window_limits_and_errors():
    assert len(plan_windows(100, 11, max_windows=3)) == 3
    with pytest.raises(ValueError, match="stride must be between 1 and 7"):
        plan_windows(100, 8, stride=8, with_bos=True)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        plan_windows(100, 1)
    with pytest.raises(ValueError, match="max_windows"):
        plan_windows(100, 8, max_windows=0)
    assert plan_windows(1, 8, with_bos=False) == []  # a lone token without BOS has nothing to predict it from


def test_window_batch_pads_right_and_never_labels_bos_or_padding():
    stream = torch.arange(10, 30)
    spans = plan_windows(len(stream), 8, stride=None, with_bos=True)  # 7 + 7 + 6 tokens
    ids, mask, labels = window_batch(stream, spans, bos_token_id=1, pad_token_id=0)
    assert ids.shape == (3, 8)
    assert (ids[:, 0] == 1).all() and (labels[:, 0] == IGNORE_INDEX).all()
    assert mask[2].tolist() == [1] * 7 + [0] and ids[2, 7] == 0 and labels[2, 7] == IGNORE_INDEX
    assert ids[0, 1:].tolist() == list(range(10, 17)) and labels[0, 1:].tolist() == list(range(10, 17))
    overlapping = plan_windows(len(stream), 8, stride=3, with_bos=True)
    _, _, labels = window_batch(stream, overlapping[1:2], bos_token_id=1, pad_token_id=0)
    # The second window holds tokens 3..9 of which 3..6 were scored by the first: only 7..9 are labelled.
    assert labels[0].tolist() == [IGNORE_INDEX] * 5 + [17, 18, 19]


# -- loss ---------------------------------------------------------------------------------------------------
def test_nll_from_logits_is_logsumexp_minus_target_logit():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=generator, dtype=torch.float64) * 4
    targets = torch.tensor([0, 3, 10, 3, 7])
    expected = [
        math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(logits.tolist(), targets.tolist())
    ]
    assert nll_from_logits(logits, targets).tolist() == pytest.approx(expected, rel=1e-6)
    assert nll_from_logits(logits.half(), targets).dtype == torch.float32


@pytest.mark.parametrize("architecture", ["llama", "gemma3", "gpt2", "opt"])
def test_chunked_loss_equals_model_loss(architecture, tokenizer):
    model = make_model(architecture)
    if architecture == "gemma3":
        model.config.final_logit_softcapping = 3.0  # exercise the soft-cap path (Gemma 2/3)
    stream = _stream(tokenizer, TEXTS["en"])
    spans = plan_windows(len(stream), 24, stride=None, with_bos=True)[:3]
    spans[-1] = type(spans[-1])(spans[-1].begin, spans[-1].end - 5, spans[-1].score_from)  # force padding
    ids, mask, labels = window_batch(stream, spans, tokenizer.bos_token_id, tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    for budget in (1 << 25, 3 * 320):  # one chunk, and chunks of 3 tokens
        nll, count = summed_nll_chunked(model, ids, mask, labels, logits_budget=budget)
        assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
        assert nll / count == pytest.approx(reference, rel=1e-5)
    nll, count = summed_nll_full(model, ids, mask, labels)
    assert nll / count == pytest.approx(reference, rel=1e-5)


# -- evaluate_perplexity ------------------------------------------------------------------------------------
def test_perplexity_equals_direct_computation(llama, tokenizer):
    seq_len = 16
    result = evaluate_perplexity(
        llama, tokenizer, TEXTS, seq_len=seq_len, show_progress=False, return_details=True
    )
    assert list(result.perplexities) == ["en", "de"]
    for lang, texts in TEXTS.items():
        stream = _stream(tokenizer, texts)
        windows = []
        for begin in range(0, len(stream), seq_len - 1):  # BOS + 15 tokens, non-overlapping
            ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), stream[begin : begin + seq_len - 1]])
            labels = ids.clone()
            labels[0] = IGNORE_INDEX
            windows.append((ids, labels))
        expected, count = _direct_ppl(llama, windows)
        details = result.languages[lang]
        assert details.tokens == count == len(stream)  # with BOS every token is scored once
        assert details.windows == len(windows)
        assert details.perplexity == pytest.approx(expected, rel=1e-4)
        assert result.perplexities[lang] == pytest.approx(math.exp(details.nll / details.tokens))


def test_sliding_window_stride_scores_only_new_tokens(llama, tokenizer):
    seq_len, stride = 16, 5
    got = evaluate_perplexity(
        llama,
        tokenizer,
        {"en": TEXTS["en"]},
        seq_len=seq_len,
        stride=stride,
        show_progress=False,
        return_details=True,
    )
    stream = _stream(tokenizer, TEXTS["en"])
    windows, scored_until = [], 0
    for begin in range(0, len(stream), stride):
        end = min(begin + seq_len - 1, len(stream))
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), stream[begin:end]])
        labels = ids.clone()
        labels[: 1 + scored_until - begin] = IGNORE_INDEX
        windows.append((ids, labels))
        scored_until = end
        if end == len(stream):
            break
    expected, count = _direct_ppl(llama, windows)
    assert got.languages["en"].tokens == count == len(stream)
    assert got.languages["en"].windows == len(windows) > len(stream) // (seq_len - 1)
    assert got.perplexities["en"] == pytest.approx(expected, rel=1e-4)
    plain = evaluate_perplexity(llama, tokenizer, {"en": TEXTS["en"]}, seq_len=seq_len, show_progress=False)
    assert plain["en"] != pytest.approx(got.perplexities["en"], rel=1e-6)  # more context changes the scores


def test_padding_is_never_scored(llama, tokenizer):
    one = evaluate_perplexity(llama, tokenizer, TEXTS, seq_len=16, batch_size=1, show_progress=False)
    # Batches of 4 windows pad the last, shorter window; a different pad id must not change anything either.
    batched = evaluate_perplexity(llama, tokenizer, TEXTS, seq_len=16, batch_size=4, show_progress=False)
    other_pad = make_tokenizer()
    other_pad.pad_token = "<eos>"
    repadded = evaluate_perplexity(llama, other_pad, TEXTS, seq_len=16, batch_size=4, show_progress=False)
    for lang in TEXTS:
        assert batched[lang] == pytest.approx(one[lang], rel=1e-5)
        assert repadded[lang] == pytest.approx(one[lang], rel=1e-5)


def test_bos_handling(llama, tokenizer):
    with_bos = evaluate_perplexity(
        llama, tokenizer, TEXTS, seq_len=16, show_progress=False, return_details=True
    )
    without = evaluate_perplexity(
        llama, tokenizer, TEXTS, seq_len=16, add_bos=False, show_progress=False, return_details=True
    )
    for lang, texts in TEXTS.items():
        n = len(_stream(tokenizer, texts))
        assert with_bos.languages[lang].tokens == n
        # Without BOS each window's first token is only context.
        assert without.languages[lang].tokens == n - without.languages[lang].windows
    assert with_bos.add_bos and not without.add_bos

    no_bos = make_tokenizer()
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    with pytest.raises(ValueError, match="no BOS token"):
        evaluate_perplexity(llama, no_bos, TEXTS, seq_len=16, show_progress=False)
    auto = evaluate_perplexity(
        llama, no_bos, TEXTS, seq_len=16, add_bos=None, show_progress=False, return_details=True
    )
    assert not auto.add_bos
    assert auto.perplexities == pytest.approx(without.perplexities, rel=1e-6)


def test_max_windows_and_details(llama, tokenizer):
    result = evaluate_perplexity(
        llama, tokenizer, TEXTS, seq_len=16, max_windows=2, show_progress=False, return_details=True
    )
    for details in result.languages.values():
        assert details.windows == 2 and details.tokens == 30
    data = result.to_dict()
    assert data["languages"]["en"]["tokens"] == 30
    # The geometric mean over languages, as everywhere in the package.
    assert data["mean_perplexity"] == pytest.approx(math.prod(result.perplexities.values()) ** 0.5)


@pytest.mark.parametrize(
    "texts,error,match",
    [
        ({"en": []}, ValueError, "'en' has no text"),
        ({"en": ["  ", "\n"]}, ValueError, "'en' has no text"),
        ({"english": ["hello"]}, ValueError, "not a language tag"),
        ({"de": ["Hallo"], "DE": ["Welt"]}, ValueError, "same language"),
        ({}, ValueError, "at least one language"),
        (["en", "hello"], TypeError, "mapping"),
        ({"en": [b"bytes"]}, TypeError, "must be strings"),
    ],
)
def test_bad_texts_are_rejected(llama, tokenizer, texts, error, match):
    with pytest.raises(error, match=match):
        evaluate_perplexity(llama, tokenizer, texts, seq_len=16, show_progress=False)


def test_bad_settings_are_rejected(llama, tokenizer):
    for kwargs, match in [
        ({"seq_len": 1}, "seq_len"),
        ({"stride": 16}, "stride must be at most 15"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_windows": 0}, "max_windows"),
        ({"loss_impl": "fast"}, "loss_impl"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate_perplexity(llama, tokenizer, TEXTS, show_progress=False, **{"seq_len": 16, **kwargs})
    # One token and no BOS: nothing can be scored, and the message names the language.
    with pytest.raises(ValueError, match="'de' has 1 token"):
        evaluate_perplexity(
            llama, tokenizer, {"en": TEXTS["en"], "de": ["a"]}, add_bos=False, show_progress=False
        )


def test_auto_falls_back_when_the_chunked_loss_would_be_wrong(tokenizer):
    base = make_model("llama")

    class ScaledLogits(type(base)):
        """A model whose forward changes the logits after the LM head in a way the chunked path cannot know."""

        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 0.5
            return output

    model = ScaledLogits(base.config)
    model.load_state_dict(base.state_dict())
    model.eval()
    full = evaluate_perplexity(model, tokenizer, TEXTS, seq_len=16, loss_impl="full", show_progress=False)
    with pytest.warns(RuntimeWarning, match="falling back to full logits"):
        auto = evaluate_perplexity(
            model, tokenizer, TEXTS, seq_len=16, show_progress=False, return_details=True
        )
    assert auto.loss_impl == "full"
    assert auto.perplexities == pytest.approx(full, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = evaluate_perplexity(
            base, tokenizer, TEXTS, seq_len=16, show_progress=False, return_details=True
        )
    assert plain.loss_impl == "chunked"


def test_offloaded_model_matches_in_memory(llama, tokenizer):
    from accelerate import cpu_offload

    reference = evaluate_perplexity(llama, tokenizer, TEXTS, seq_len=16, show_progress=False)
    offloaded = make_model("llama")
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    assert input_device(offloaded) == torch.device("cpu")
    result = evaluate_perplexity(offloaded, tokenizer, TEXTS, seq_len=16, show_progress=False)
    assert result == pytest.approx(reference, rel=1e-5)


def test_training_mode_is_restored(tokenizer):
    model = make_model("llama").train()
    evaluate_perplexity(model, tokenizer, TEXTS, seq_len=16, show_progress=False)
    assert model.training


# -- evaluate.Metric ----------------------------------------------------------------------------------------
def test_metric_offline(llama, tokenizer, tmp_path):
    metric = MultilingualPerplexity(cache_dir=str(tmp_path), seq_len=16)
    predictions = TEXTS["en"] + TEXTS["de"]
    languages = ["en"] * len(TEXTS["en"]) + ["de"] * len(TEXTS["de"])
    out = metric.compute(predictions=predictions, languages=languages, model=llama, tokenizer=tokenizer)
    expected = evaluate_perplexity(llama, tokenizer, TEXTS, seq_len=16, show_progress=False)
    assert out["perplexities"] == pytest.approx(expected, rel=1e-6)
    assert out["mean_perplexity"] == pytest.approx(math.prod(expected.values()) ** 0.5)
    assert out["tokens"]["en"] == len(_stream(tokenizer, TEXTS["en"]))
    assert metric.name == "multilingual_perplexity"

    # Incremental use, with model/tokenizer given to the constructor.
    incremental = MultilingualPerplexity(model=llama, tokenizer=tokenizer, cache_dir=str(tmp_path))
    incremental.add_batch(predictions=TEXTS["en"], languages=["en"] * len(TEXTS["en"]))
    for text in TEXTS["de"]:
        incremental.add(predictions=text, languages="de")
    assert incremental.compute(seq_len=16)["perplexities"] == pytest.approx(expected, rel=1e-6)

    with pytest.raises(ValueError, match="needs model= and tokenizer="):
        MultilingualPerplexity(cache_dir=str(tmp_path)).compute(predictions=["Hallo"], languages=["de"])
    with pytest.raises(ValueError, match="unknown MultilingualPerplexity arguments"):
        metric.compute(predictions=["Hallo"], languages=["de"], model=llama, tokenizer=tokenizer, bogus=1)


# -- sweep result: tables and heatmap -----------------------------------------------------------------------
def _fake_sweep() -> SweepResult:
    return SweepResult(
        eval_languages=["en", "de", "sw"],
        rows={
            "en": {"en": 20.0, "de": 60.0, "sw": 300.0},
            "de": {"en": 30.0, "de": 40.0, "sw": 250.0},
            "mix": {"en": 22.0, "de": 44.0, "sw": 260.0},
        },
        row_languages={"en": ["en"], "de": ["de"], "mix": ["en", "de"]},
        dense={"en": 10.0, "de": 20.0, "sw": 100.0},
        method="wanda",
        config={"sparsity": 0.5},
    )


def test_sweep_result_tables():
    sweep = _fake_sweep()
    assert sweep.relative_matrix()[0] == [2.0, 3.0, 3.0]
    assert sweep.best_calibration() == {"en": "en", "de": "de", "sw": "de"}
    table = sweep.to_markdown()
    lines = table.strip().splitlines()
    assert lines[0] == "| calibration \\ eval | en | de | sw |"
    assert lines[2] == "| dense | 10.00 | 20.00 | 100.00 |"
    assert lines[5] == "| mix (en+de) | 22.00 | 44.00 | 260.00 |"
    assert "| de | ×3.00 | ×2.00 | ×2.50 |" in sweep.to_markdown(relative=True)
    assert SweepResult.from_dict(sweep.to_dict()) == sweep
    with pytest.raises(ValueError, match="lacks evaluation languages"):
        SweepResult(eval_languages=["en", "de"], rows={"en": {"en": 1.0}})
    with pytest.raises(ValueError, match="no dense baseline"):
        SweepResult(eval_languages=["en"], rows={"en": {"en": 1.0}}).relative_matrix()


@pytest.mark.parametrize("relative", [True, False])
def test_heatmap_is_a_png(tmp_path, relative):
    from matplotlib.image import imread

    path = tmp_path / "sweep.png"
    _fake_sweep().plot_heatmap(path, relative=relative)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    image = imread(path)
    assert image.shape[:2] == (height, width) and width > 300 and height > 200
    # Cells are coloured by value, so the picture is not blank.
    assert image[..., :3].std() > 0.05


# -- the sweep on a tiny model ------------------------------------------------------------------------------
def test_calibration_language_sweep(tokenizer):
    corpus = text_corpus()
    calibration = {lang: texts[:40] for lang, texts in corpus.items()}
    held_out = {lang: texts[40:48] for lang, texts in corpus.items()}
    config = WandaConfig(sparsity=0.5, samples_per_language=2, calibration_seq_len=16)
    made = []

    def factory():
        made.append(make_model("llama"))
        return made[-1]

    sweep = calibration_language_sweep(
        factory,
        tokenizer,
        config,
        calibration,
        held_out,
        calibration_languages=["en", "sw"],
        mixes={"en+de": ["en", "de"]},
        seq_len=64,
        batch_size=4,
        show_progress=False,
    )
    assert len(made) == 4  # dense + three pruned rows, each on a fresh model
    assert sweep.row_names == ["en", "sw", "en+de"] and sweep.eval_languages == ["en", "de", "sw"]
    assert sweep.row_languages["en+de"] == ["en", "de"]
    assert sweep.dense == pytest.approx(
        evaluate_perplexity(make_model("llama"), tokenizer, held_out, seq_len=64, show_progress=False)
    )
    for report in sweep.reports.values():
        assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
        assert (
            sum(report["token_counts"].values()) == 2 * 16
        )  # the same budget for single languages and mixes
    assert sweep.reports["en+de"]["token_counts"] == {"en": 16, "de": 16}
    # Each row is what pruning a fresh model on that calibration data and evaluating it gives.
    model = make_model("llama")
    calib = build_calibration(
        {"sw": calibration["sw"]}, tokenizer, samples_per_language=2, seq_len=16, seed=0
    )
    Pruner(config).prune_model(model, calib, show_progress=False)
    assert sweep.rows["sw"] == pytest.approx(
        evaluate_perplexity(model, tokenizer, held_out, seq_len=64, show_progress=False)
    )
    # Pruning hurts: every pruned row is worse than dense on average.
    for name in sweep.row_names:
        assert sum(sweep.rows[name].values()) > sum(sweep.dense.values())


def test_sweep_rejects_bad_plans_before_building_models(tokenizer):
    corpus = text_corpus()
    config = WandaConfig(sparsity=0.5, samples_per_language=2, calibration_seq_len=16)

    def factory():
        raise AssertionError("no model may be built for an invalid sweep")

    for kwargs, error, match in [
        ({"calibration_languages": ["fr"]}, ValueError, "'fr' has no calibration text"),
        ({"mixes": {"en": ["de", "sw"]}}, ValueError, "collides"),
        ({"mixes": {"mix": ["en", "fr"]}}, ValueError, "without calibration text"),
        ({"mixes": {"mix": "en"}}, TypeError, "must list languages"),
        ({"calibration_languages": [], "mixes": None}, ValueError, "no rows"),
        ({"seq_len": 16, "stride": 40}, ValueError, "stride must be at most 15"),
    ]:
        with pytest.raises(error, match=match):
            calibration_language_sweep(
                factory, tokenizer, config, corpus, corpus, show_progress=False, **kwargs
            )
    with pytest.raises(TypeError, match="PruningConfig"):
        calibration_language_sweep(factory, tokenizer, {"sparsity": 0.5}, corpus, corpus)
    short = {"en": ["too short"]}
    with pytest.raises(ValueError, match="'en'"):
        calibration_language_sweep(factory, tokenizer, config, short, corpus, show_progress=False)
