"""The llm-compressor comparison's pure helpers (run names, summaries, tables, report) on made-up numbers.

No llm-compressor install, model or subprocess is needed: these are the parts that turn measured records
into the committed table.
"""

import math

import pytest
from repo_scripts import load_script

peer = load_script("benchmarks/peer_llmcompressor.py")

LANGS = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def _record(scale: float, ratio_to_floor: float = 2.0) -> dict:
    ppl = {lang: scale * (i + 10) for i, lang in enumerate(LANGS)}
    ppl.update({"fr": scale * 20, "it": scale * 30, "tr": scale * 40, "vi": scale * 50, "pl": scale * 60})
    return {
        "perplexity": ppl,
        "timing": {
            "seconds": 60.0 * ratio_to_floor,
            "floor_seconds": 60.0,
            "ratio_to_floor": ratio_to_floor,
            "peak_rss_mb": 1800.0,
            "load_average_1min": 2.5,
            "achieved_sparsity": 0.5,
            "peak_rss_after_load_mb": 1500.0,
        },
    }


def test_parse_structure():
    assert peer.parse_structure("50") == "50"
    assert peer.parse_structure("50%") == "50"
    assert peer.parse_structure("0.6") == "60"
    assert peer.parse_structure("2:4") == "2:4"
    for bad in ("4:2", "0:4", "a:b", "1:2:3", "100", "0", "half"):
        with pytest.raises(ValueError):
            peer.parse_structure(bad)


def test_parse_run_and_notations():
    spec = peer.parse_run("llmc-sparsegpt@2:4")
    assert (spec.tool, spec.method, spec.structure) == ("llmc", "sparsegpt", "2:4")
    assert spec.sparsity == pytest.approx(0.5)
    assert spec.llmc_mask_structure == "2:4" and spec.mask_structure == "2:4"
    spec = peer.parse_run("ours-mwanda@50")
    assert spec.sparsity == pytest.approx(0.5)
    assert spec.mask_structure == "unstructured" and spec.llmc_mask_structure == "0:0"
    assert spec.name == "ours-mwanda@50" and spec.label == "optimum-mwanda M-Wanda"
    assert peer.parse_run("dense").sparsity == 0.0
    # llm-compressor has no M-Wanda; unknown tools and malformed names are refused
    for bad in ("llmc-mwanda@50", "foo-wanda@50", "ours-wanda", "ourswanda@50", "ours-obs@50"):
        with pytest.raises(ValueError):
            peer.parse_run(bad)


def test_expand_runs():
    names = [r.name for r in peer.expand_runs(["all"], ["50", "2:4"])]
    assert names[0] == "dense"
    assert len(names) == 1 + 2 * 5
    assert "llmc-wanda@2:4" in names and "ours-mwanda@50" in names
    names = [r.name for r in peer.expand_runs(["ours-wanda", "ours-wanda@50", "dense"], ["50"])]
    assert names == ["ours-wanda@50", "dense"]


def test_geometric_mean_and_groups():
    assert peer.geometric_mean([4.0, 9.0]) == pytest.approx(6.0)
    assert math.isnan(peer.geometric_mean([]))
    assert math.isnan(peer.geometric_mean([1.0, float("nan")]))
    record = _record(1.0)
    groups = peer.language_groups(record, LANGS)
    assert groups["in"] == LANGS
    assert groups["absent"] == ["fr", "it", "tr", "vi", "pl"]
    assert groups["study_absent"] == ["fr", "it", "tr", "vi"]
    summary = peer.summarize(record, LANGS)
    assert summary["study_absent"] == pytest.approx(peer.geometric_mean([20, 30, 40, 50]))
    assert summary["all"] == pytest.approx(peer.geometric_mean(list(record["perplexity"].values())))


def test_pairwise_ratios():
    results = {
        "ours-wanda@50": _record(1.0, 1.8),
        "llmc-wanda@50": _record(1.1, 2.4),
        "llmc-sparsegpt@50": _record(0.9, 3.6),
        "ours-mwanda@50": _record(0.8, 1.9),
    }
    rows = {row["pair"]: row for row in peer.pairwise_ratios(results, "50", LANGS)}
    assert rows["llmc-wanda / ours-wanda"]["all"] == pytest.approx(1.1)
    assert rows["llmc-wanda / ours-wanda"]["in"] == pytest.approx(1.1)
    assert rows["llmc-wanda / ours-wanda"]["time"] == pytest.approx(2.4 / 1.8)
    assert rows["ours-mwanda / llmc-sparsegpt"]["absent"] == pytest.approx(0.8 / 0.9)
    assert "llmc-sparsegpt / ours-sparsegpt" not in rows  # no ours-sparsegpt record: no row


def test_tables_and_report():
    cache = {
        "commands": ["python benchmarks/peer_llmcompressor.py"],
        "settings": {"languages": LANGS, "samples_per_language": 8, "seq_len": 512, "threads": 2},
        "results": {
            "llmc-wanda@2:4": _record(2.0, 2.5),
            "ours-wanda@50": _record(1.0, 1.8),
            "dense": {"perplexity": _record(0.5)["perplexity"]},
            "llmc-wanda@50": {**_record(1.1, 2.4), "downstream": {"story": {"acc": 0.4, "acc_norm": 0.5}}},
        },
    }
    order = peer.ordered_names(cache["results"])
    assert order == ["dense", "ours-wanda@50", "llmc-wanda@50", "llmc-wanda@2:4"]
    table = peer.perplexity_table(cache["results"], order, LANGS)
    assert table.count("\n") == 1 + len(order)
    header = table.splitlines()[0]
    assert "| pl* |" in header and "| ar |" in header and "geomean fr/it/tr/vi*" in header
    timing = peer.timing_table(cache["results"], order)
    assert "| llm-compressor Wanda @50 | 144.0 | 60.0 | 2.40 | 1500 | 1800 | 2.50 | 0.5000 |" in timing
    assert "dense" not in timing  # no timing for the dense model
    report = peer.render_report(cache)
    assert "## Head to head at 50%" in report and "## Head to head at 2:4" not in report  # 2:4 has one tool
    assert "| llmc-wanda / ours-wanda | 1.100 |" in report
    assert "**story, acc_norm**" in report and "0.500" in report


def test_downstream_table_has_one_table_per_task_family_and_metric():
    results = {
        "dense": {"downstream": {"cont_de": {"acc": 0.5, "sample_len": 10}, "cont_sw": {"acc": 0.3}}},
        "ours-wanda@50": {"downstream": {"cont_de": {"acc": 0.4}, "cont_sw": {"acc": 0.2}}},
        "llmc-wanda@50": {"downstream": {"cont_de": {"acc": 0.1}}},
    }
    table = peer.downstream_table(results, ["dense", "ours-wanda@50", "llmc-wanda@50"])
    assert table.startswith("**cont, acc** (10 documents per language)")
    assert "| run | de | sw | mean |" in table
    assert "| dense | 0.500 | 0.300 | 0.400 |" in table
    assert "| optimum-mwanda Wanda @50 | 0.400 | 0.200 | 0.300 |" in table
    assert "| llm-compressor Wanda @50 | 0.100 | - | - |" in table  # no mean over a missing language


def test_normalize_downstream():
    raw = {
        "results": {
            "xstory_sw": {
                "alias": "xstory_sw",
                "acc,none": 0.5,
                "acc_stderr,none": 0.1,
                "acc_norm,none": 0.6,
            },
            "group": "not a mapping",
        }
    }
    assert peer.normalize_downstream(raw) == {"xstory_sw": {"acc": 0.5, "acc_norm": 0.6}}
    assert peer.normalize_downstream({"t": {"chrf": 31}}) == {"t": {"chrf": 31.0}}

    class Result:  # the shape of optimum_mwanda.evaluation's DownstreamResult
        def eval_results(self):
            return {"mwanda_continuation_de": {"acc": 0.3, "acc_norm": 0.25, "flag": True}}

    assert peer.normalize_downstream(Result()) == {"mwanda_continuation_de": {"acc": 0.3, "acc_norm": 0.25}}


def test_parser_defaults_match_the_study():
    args = peer.build_parser().parse_args([])
    assert args.languages == LANGS
    assert (args.samples_per_language, args.seq_len, args.batch_size, args.seed) == (8, 512, 4, 0)
    assert (args.max_windows, args.absent_max_windows, args.threads) == (4, 2, 2)
    assert args.structures == ["50"] and args.runs == ["all"]
    key = peer.settings_key(args)
    assert key["languages"] == LANGS and key["threads"] == 2


def test_merge_evaluations():
    settings = {"languages": LANGS, "seed": 0, "max_windows": 2, "threads": 2}
    timed = {
        "settings": settings,
        "commands": ["a"],
        "results": {"ours-wanda@50": {"timing": {"seconds": 1}}},
    }
    evaluated = {
        "settings": {**settings, "threads": 1},  # the thread count does not change a perplexity
        "commands": ["b"],
        "results": {"ours-wanda@50": {"perplexity": {"en": 3.0}}, "dense": {"perplexity": {"en": 2.0}}},
    }
    merged = peer.merge_evaluations(timed, [evaluated])
    assert merged["results"]["ours-wanda@50"] == {"timing": {"seconds": 1}, "perplexity": {"en": 3.0}}
    assert merged["results"]["dense"] == {"perplexity": {"en": 2.0}}
    assert merged["commands"] == ["a", "b"]
    with pytest.raises(ValueError):  # other windows than the evaluations already merged
        peer.merge_evaluations(merged, [{"settings": {**settings, "max_windows": 4}, "results": {}}])
    with pytest.raises(ValueError):  # other calibration: other pruned weights
        peer.merge_evaluations(timed, [{"settings": {**settings, "seed": 1}, "results": {}}])
    # windows of a timing-only output are replaced by those of the (first) evaluation merged in
    fresh = {"settings": {**settings, "max_windows": 2}, "results": {"x@50": {"timing": {}}}}
    merged = peer.merge_evaluations(fresh, [{"settings": {**settings, "max_windows": 1}, "results": {}}])
    assert merged["settings"]["max_windows"] == 1


def test_mask_agreement():
    import torch

    a = {"w": torch.tensor([[0.0, 1.0, 0.0, 2.0]]), "v": torch.tensor([3.0, 0.0])}
    b = {"w": torch.tensor([[0.0, 1.0, 5.0, 0.0]]), "v": torch.tensor([3.5, 0.0])}
    agreement = peer.mask_agreement(a, b)
    assert agreement["same_mask"] == pytest.approx(4 / 6)  # w: positions 0, 1 agree; v: both agree
    assert agreement["same_value"] == pytest.approx(1 / 2)  # kept in both: w[1] (equal), v[0] (differs)
    assert peer.mask_agreement(a, a) == {"same_mask": 1.0, "same_value": 1.0}
    with pytest.raises(ValueError):
        peer.mask_agreement(a, {"w": a["w"]})


def test_mask_agreements_pairs_runs_from_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    ours = {"w": torch.tensor([1.0, 0.0, 2.0, 0.0])}
    theirs = {"w": torch.tensor([1.0, 0.0, 0.0, 3.0])}
    save_file(ours, str(peer.weights_file(tmp_path, "ours-wanda@2:4")))
    save_file(theirs, str(peer.weights_file(tmp_path, "llmc-wanda@2:4")))
    names = ["ours-wanda@2:4", "llmc-wanda@2:4", "ours-mwanda@2:4", "ours-sparsegpt@2:4"]
    result = peer.mask_agreements(tmp_path, names)
    assert list(result) == ["ours-wanda@2:4 vs llmc-wanda@2:4"]  # no llmc-sparsegpt weights, no M-Wanda peer
    assert result["ours-wanda@2:4 vs llmc-wanda@2:4"]["same_mask"] == pytest.approx(0.5)
    assert ":" not in peer.weights_file(tmp_path, "ours-wanda@2:4").name
