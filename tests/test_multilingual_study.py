"""The multilingual study's pure helpers (names, means, verdict, tables, report) on made-up numbers."""

import json
import math

import pytest
from repo_scripts import load_script

study = load_script("benchmarks/multilingual_study.py")

LANGS = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def _record(ppl: dict, sparsity: float, settings=None, prune_seconds=100.0) -> dict:
    return {"settings": settings, "sparsity": sparsity, "perplexity": ppl, "prune_seconds": prune_seconds}


def test_geometric_mean():
    assert study.geometric_mean([4.0, 9.0]) == pytest.approx(6.0)
    assert study.geometric_mean([10.0]) == pytest.approx(10.0)
    assert math.isnan(study.geometric_mean([]))
    assert math.isnan(study.geometric_mean([2.0, float("inf")]))
    assert math.isnan(study.geometric_mean([2.0, 0.0]))


def test_parse_names_aliases_and_defaults():
    assert study.parse_config_name("dense").name == "dense"
    config = study.parse_config_name("mwanda[variance_weight=0.5]@50")
    assert (config.method, config.sparsity, config.options) == ("mwanda", 0.5, (("variance_weight", 0.5),))
    # An option equal to the default is dropped: one configuration, one cache key.
    assert study.parse_config_name("mwanda[variance_weight=0.0]@50").name == "mwanda@50"
    assert (
        study.parse_config_name("mwanda-no-actprob@60").name == "mwanda[activation_probability_weight=0]@60"
    )
    english = study.parse_config_name("wanda-en@50")
    assert english.english_only and english.method == "wanda" and english.name == "wanda-en@50"
    built = study.parse_config_name("mwanda[layerwise=cwl,cwl_protect=shared]@50").pruning_config()
    assert (built.layerwise, built.cwl_protect, built.sparsity) == ("cwl", "shared", 0.5)


@pytest.mark.parametrize(
    "name, message",
    [
        ("bogus@50", "unknown configuration base"),
        ("wanda", "names no sparsity"),
        ("wanda[layerwise=cwl]@50", "cwl"),  # CWL is M-Wanda only: the config refuses it
        ("mwanda[no_such_field=1]@50", "no_such_field"),
        ("mwanda[variance_weight]@50", "malformed option"),
        ("dense@50", "takes no options"),
        ("wanda@@50", "malformed configuration name"),
    ],
)
def test_parse_names_rejects_bad_input(name, message):
    with pytest.raises(ValueError, match=message):
        study.parse_config_name(name)


def test_expand_groups_without_duplicates():
    names = [c.name for c in study.expand_config_names(["main", "wanda@50", "mwanda"], [0.5, 0.6])]
    assert names == [
        "dense",
        "wanda@50",
        "sparsegpt@50",
        "mwanda@50",
        "wanda@60",
        "sparsegpt@60",
        "mwanda@60",
    ]
    ablations = [c.name for c in study.expand_config_names(["ablations"], [0.5, 0.6])]
    assert ablations[:3] == [
        "wanda-en@50",
        "mwanda[variance_weight=1]@50",
        "mwanda[activation_probability_weight=0]@50",
    ]
    assert len(ablations) == 6 and ablations[3].startswith("mwanda[layerwise=")
    assert ablations[4:] == ["mwanda[mean_compensation=none]@50", "mwanda[mean_compensation=pooled]@50"]


def test_compare_and_verdict():
    wanda = dict(zip(LANGS, [100.0, 80.0, 60.0, 70.0, 120.0, 300.0, 90.0]))
    better = {lang: v * 0.9 for lang, v in wanda.items()}
    better["sw"] = 310.0  # worse on one language only
    results = {"wanda@50": _record(wanda, 0.5), "mwanda@50": _record(better, 0.5)}
    verdict = study.research_verdict(results, LANGS, 0.5)
    assert verdict["n_wins"] == 6 and "sw" not in verdict["wins"]
    assert verdict["beats_geomean"] and verdict["beats_mean"] and verdict["beats"]
    # Mean lower but only 4 wins: not enough.
    mixed = dict(wanda, ar=50.0, de=40.0, en=30.0, es=35.0, ru=130.0, sw=310.0, zh=95.0)
    results["mwanda@50"] = _record({**mixed, "ar": 50.0}, 0.5)
    mixed_verdict = study.research_verdict(results, LANGS, 0.5)
    assert mixed_verdict["n_wins"] == 4 and mixed_verdict["beats_geomean"] and not mixed_verdict["beats"]
    assert study.research_verdict(results, LANGS, 0.6) is None
    with pytest.raises(ValueError, match="no perplexity"):
        study.compare_configs({"en": 1.0}, wanda, LANGS)


def test_tables_and_report(tmp_path):
    args = study.build_parser().parse_args(["--output", str(tmp_path / "study")])
    key = study.settings_key(args)
    extras = args.extra_eval_languages
    dense = {lang: 20.0 + i for i, lang in enumerate(LANGS + extras)}
    wanda = {lang: 3 * v for lang, v in dense.items()}
    mwanda = {lang: 2.5 * v for lang, v in dense.items()}
    cache = {
        "results": {
            "dense": _record(dense, 0.0, key, prune_seconds=None),
            "wanda@50": _record(wanda, 0.5, key),
            "mwanda@50": _record(mwanda, 0.5, key, prune_seconds=123.4),
            "mwanda[variance_weight=2]@50": {
                "settings": key,
                "sparsity": 0.5,
                "error": "FloatingPointError: x",
            },
            "wanda@60": _record(wanda, 0.6, {"other": "settings"}),  # stale: left out of the report
        },
        "environment": {"threads": 1},
    }
    (tmp_path / "study.json").write_text(json.dumps(cache))
    markdown = study.write_report(study.load_cache(tmp_path / "study.json"), args, "python x.py")
    rows = [line for line in markdown.splitlines() if line.startswith("| mwanda@50 |")]
    geo = study.geometric_mean(mwanda[lang] for lang in LANGS)
    assert rows and f"**{geo:.1f}**" in rows[0] and rows[0].rstrip(" |").endswith("123")
    assert "- 50%: **yes**" in markdown and "lower on 7/7" in markdown
    assert "- 60%: not measured yet" in markdown
    assert not any(line.startswith("| wanda@60 |") for line in markdown.splitlines())
    assert "failed: FloatingPointError" in markdown
    assert "-16.7%" in markdown  # 2.5/3 - 1 in the comparison table
    assert (tmp_path / "study.md").read_text() == markdown
    assert (tmp_path / "study.png").stat().st_size > 1000


def test_cached_records_are_renamed_from_their_config():
    from optimum_mwanda import MWandaConfig

    old_default = MWandaConfig(sparsity=0.5, variance_weight=1.0, activation_threshold=1.0).to_dict()
    assert study.canonical_name("mwanda@50", {"config": old_default}) == (
        "mwanda[activation_threshold=1,variance_weight=1]@50"
    )
    current = MWandaConfig(sparsity=0.5).to_dict()
    assert study.canonical_name("mwanda@50", {"config": current}) == "mwanda@50"
    assert study.canonical_name("dense", {}) == "dense"


def test_records_written_before_a_field_existed_keep_their_legacy_behaviour():
    from optimum_mwanda import MWandaConfig

    def written_before(field: str, **kwargs) -> dict:
        """Today's config dict without ``field`` and every field added after it."""
        record = study.flat_config(MWandaConfig(**kwargs).to_dict())
        later = list(MWandaConfig.fields_added_later)
        for name in later[later.index(field) :]:
            del record[name]
        return record

    before_compensation = written_before("mean_compensation", sparsity=0.6)
    assert study.canonical_name("mwanda@60", {"config": before_compensation}) == (
        "mwanda[mean_compensation=none]@60"
    )
    assert study.parse_config_name("mwanda-no-compensation@60").name == "mwanda[mean_compensation=none]@60"
    # Written after the mean compensation but before the low-rank one: it ran means-only (rank 0), and
    # without the closed form's shrinkage (added later still).
    before_rank = written_before("compensation_rank", sparsity=0.6)
    assert study.canonical_name("mwanda@60", {"config": before_rank}) == (
        "mwanda[compensation_rank=0,diagonal_dampening=0]@60"
    )
    today = MWandaConfig(sparsity=0.6).to_dict()
    assert study.canonical_name("mwanda@60", {"config": today}) == "mwanda@60"
    # Written when the closed form was unshrunk by default (rounds 5-8 stored the resolved 0).
    unshrunk = MWandaConfig(sparsity=0.6, diagonal_dampening=0).to_dict()
    assert study.canonical_name("mwanda@60", {"config": unshrunk}) == "mwanda[diagonal_dampening=0]@60"
    # A 2:4 record from before the sweep became the N:M default ran the rank-32 closed form; the rank
    # follows from weight_update, so only weight_update (and the shrinkage it ran without) enter the name.
    before_sweep = written_before("weight_update", sparsity=0.5, mask_structure="2:4", compensation_rank=32)
    assert study.canonical_name("mwanda[mask_structure=2:4]@50", {"config": before_sweep}) == (
        "mwanda[diagonal_dampening=0,mask_structure=2:4,weight_update=closed_form]@50"
    )
    sweep = MWandaConfig(sparsity=0.5, mask_structure="2:4").to_dict()
    assert study.canonical_name("x", {"config": sweep}) == "mwanda[mask_structure=2:4]@50"
    # Written when the sweep's shrinkage was 0.1 (rounds 5-9 stored the resolved value).
    lighter = MWandaConfig(sparsity=0.5, mask_structure="2:4", diagonal_dampening=0.1).to_dict()
    assert study.canonical_name("mwanda[mask_structure=2:4]@50", {"config": lighter}) == (
        "mwanda[diagonal_dampening=0.1,mask_structure=2:4]@50"
    )
    # From 70% the default is the sweep: a closed-form record written there before keeps its meaning.
    closed_at_70 = MWandaConfig(sparsity=0.7, weight_update="closed_form").to_dict()
    assert study.canonical_name("mwanda@70", {"config": closed_at_70}) == (
        "mwanda[weight_update=closed_form]@70"
    )
    assert study.canonical_name("x", {"config": MWandaConfig(sparsity=0.7).to_dict()}) == "mwanda@70"


def test_defaults_that_depend_on_other_options_do_not_enter_the_name():
    """An N:M record stores ``layerwise="uniform"`` (what ``None`` resolved to): it is still the default."""
    from optimum_mwanda import MWandaConfig

    config = MWandaConfig(sparsity=0.5, mask_structure="2:4").to_dict()
    assert config["layerwise"] == "uniform"  # (the record's weight_update is None: the automatic choice)
    name = "mwanda[mask_structure=2:4]@50"
    assert study.canonical_name(name, {"config": config}) == name
    assert study.parse_config_name("mwanda[layerwise=uniform,mask_structure=2:4]@50").name == name
    no_compensation = MWandaConfig(sparsity=0.5, mean_compensation="none").to_dict()
    assert study.flat_config(no_compensation)["compensation_rank"] == 0
    assert study.canonical_name("x", {"config": no_compensation}) == "mwanda[mean_compensation=none]@50"


def test_merging_parallel_shards_adds_finished_records_and_commands():
    main = {"results": {"wanda@50": {"perplexity": {"en": 1.0}}}, "commands": ["a"]}
    shard = {
        "results": {
            "wanda@50": {"perplexity": {"en": 9.0}},
            "mwanda@50": {"perplexity": {"en": 2.0}},
            "mwanda@60": {"error": "FloatingPointError"},
        },
        "commands": ["a", "b --output /tmp/shard"],
    }
    merged = study.merge_caches(main, [shard])
    assert merged["results"]["wanda@50"]["perplexity"]["en"] == 1.0  # the existing record wins
    assert merged["results"]["mwanda@50"]["perplexity"]["en"] == 2.0
    assert "mwanda@60" not in merged["results"]  # unfinished records are not merged
    assert merged["commands"] == ["a", "b --output /tmp/shard"]


def test_report_without_a_dense_row(tmp_path):
    """A shard that ran only some configurations (no dense baseline) still gets its report."""
    args = study.build_parser().parse_args(["--output", str(tmp_path / "study"), "--seed", "1"])
    key = study.settings_key(args)
    wanda = {lang: 30.0 + i for i, lang in enumerate(LANGS + args.extra_eval_languages)}
    cache = {"results": {"wanda@50": _record(wanda, 0.5, key)}}
    markdown = study.write_report(cache, args, "python x.py")
    assert "| wanda@50 |" in markdown and "| dense |" not in markdown


def test_prune_speed_runs_take_config_options_in_brackets():
    """benchmarks/prune_speed.py names its runs like the study: a method, optionally with config fields."""
    from types import SimpleNamespace

    speed = load_script("benchmarks/prune_speed.py")
    args = SimpleNamespace(sparsity=0.6, batch_size=2, mask_structure=None)
    config = speed._config("mwanda", args)
    assert (config.method, config.sparsity, config.batch_size) == ("mwanda", 0.6, 2)
    args.mask_structure = "2:4"
    config = speed._config("mwanda[hessian_token_stride=4]", args)
    assert (config.sparsity, config.mask_structure, config.hessian_token_stride) == (0.5, "2:4", 4)
    assert speed._config("sparsegpt", args).hessian_token_stride == 1
    # A sweep-only field is checked on the N:M config, not on a 50% unstructured one.
    config = speed._config("mwanda[refinement_steps=3]", args)
    assert (config.mask_structure, config.resolve().weight_update.refinement_steps) == ("2:4", 3)
    assert (
        speed.with_option("mwanda[mask_structure=4:8]", "mask_structure=2:4") == "mwanda[mask_structure=4:8]"
    )
    with pytest.raises(ValueError, match="unknown"):
        speed._config("gptq", args)
    with pytest.raises(ValueError, match="dense"):
        speed._config("dense", args)


def test_prune_speed_repeats_report_the_median_run_and_every_measurement():
    """--repeats keeps every measurement and reports the run with the median seconds."""
    speed = load_script("benchmarks/prune_speed.py")
    runs = [{"seconds": s, "ratio_to_floor": s / 10, "tag": s} for s in (12.0, 10.0, 30.0)]
    median = speed.median_run(runs)
    assert median["tag"] == 12.0
    assert median["all_seconds"] == [12.0, 10.0, 30.0]
    assert median["all_ratio_to_floor"] == [1.2, 1.0, 3.0]
    assert median["all_timings"] == [{}, {}, {}]
    assert speed.median_run(runs[:2])["tag"] == 10.0
    with pytest.raises(ValueError):
        speed.median_run([])
