"""Model cards of mixture-of-experts models and the coverage contract: expert settings, the experts that fell
back to the pooled rule, routing shares per language, and every weight left dense by ``allow_unpruned``."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from hub_fixtures import make_report, tiny_llama
from tiny_models import make_model, make_moe_model, make_token_calibration

from optimum_mwanda import Pruner, WandaConfig
from optimum_mwanda.hub import create_model_card
from optimum_mwanda.hub.card import MAX_EXPERT_ROWS, TOP_EXPERTS, spread
from optimum_mwanda.modeling.coverage import DENSE, PRUNED, UNREACHABLE, CoverageEntry, CoveragePlan
from optimum_mwanda.modeling.experts import FALLBACK_RULE, ExpertOptions
from optimum_mwanda.report import PruningReport

torch.set_num_threads(1)

CALIBRATION = dict(languages=("en", "de", "sw"), n=4, seq_len=16)


def _section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section (up to the next ``## `` heading)."""
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def _rows(section: str, header_start: str) -> list[list[str]]:
    """The cells of every row of the table whose header starts with ``header_start`` in ``section``."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        # Cells split at unescaped pipes (an escaped ``\\|`` is text inside a cell).
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
    return rows


def _headings_have_content(text: str) -> None:
    parts = re.split(r"^## .*$", text, flags=re.MULTILINE)
    assert all(part.strip() for part in parts[1:]), "an empty section heading"


@pytest.fixture(scope="module")
def fallback_run():
    """Qwen3-MoE pruned with a token threshold above every expert's routed count: every expert falls back."""
    model = make_moe_model("qwen3_moe")
    report = Pruner(WandaConfig()).prune_model(
        model,
        make_token_calibration(**CALIBRATION),
        show_progress=False,
        experts=ExpertOptions(min_tokens=10_000),
    )
    return report, create_model_card(report).text


def test_moe_card_records_expert_settings_and_every_fallback_expert(fallback_run):
    report, text = fallback_run
    _headings_have_content(text)
    section = _section(text, "Mixture of experts")
    assert "2 mixture-of-experts blocks of 8 experts each" in section
    settings = {row[0]: row[1] for row in _rows(section, "Setting")}
    assert settings == {
        "`router_weighted`": "False",
        "`calibrate_all_experts`": "False",
        "`min_tokens`": "10000",
    }
    assert "16 of 16 experts were routed fewer than `min_tokens` = 10000 calibration tokens" in section
    assert FALLBACK_RULE in section
    # One row per expert that fell back: its layer, index and routed tokens, as the report records them.
    expected = [
        [layer, str(expert), f"{report.experts[name]['tokens'][expert]:,}", "every token of its MoE block"]
        for name, layer in (("model.layers.0.mlp.experts", "0"), ("model.layers.1.mlp.experts", "1"))
        for expert in report.expert_fallbacks[name]
    ]
    assert len(expected) == 16
    assert _rows(section, "Layer | Expert") == expected


def test_moe_card_shows_routing_shares_per_language(fallback_run):
    report, text = fallback_run
    section = _section(text, "Mixture of experts")
    summary = {row[1]: row for row in _rows(section, "Language | Code")}
    assert set(summary) == {"`en`", "`de`", "`sw`"}
    for lang in ("en", "de", "sw"):
        shares = report.routing_shares[lang]
        busiest = [max(values) for values in shares.values()]
        row = summary[f"`{lang}`"]
        assert row[2] == f"{100 * sum(busiest) / len(busiest):.1f}%"
        assert row[3] == f"{100 * max(busiest):.1f}%"
        above = [sum(1 for v in values if v > 1 / 8) for values in shares.values()]
        assert row[4] == f"{sum(above) / len(above):.1f} of 8"
    detail = _rows(section, "Layer | Language")
    assert len(detail) == 2 * 3  # every layer, every language: under the cap
    names = {"English": "en", "German": "de", "Swahili": "sw"}
    for layer, language, top, above in detail:
        values = report.routing_shares[names[language]][f"model.layers.{layer}.mlp.experts"]
        order = sorted(range(8), key=lambda e: (-values[e], e))[:TOP_EXPERTS]
        assert top == ", ".join(f"{e} ({100 * values[e]:.1f}%)" for e in order)
        assert above == f"{sum(1 for v in values if v > 1 / 8)} of 8"


def test_moe_card_counts_expert_matrices_and_coverage(fallback_run):
    report, text = fallback_run
    facts = _section(text, "What was done")
    achieved = next(row for row in _rows(facts, "|") if row[0] == "Achieved sparsity")[1]
    assert "linear modules" not in text
    assert achieved.startswith(f"{100 * report.achieved_sparsity:.1f}% of the weights of 40 weight matrices")
    assert "32 of them expert matrices, counted one per expert and projection" in achieved
    coverage = next(row for row in _rows(facts, "|") if row[0] == "Coverage")[1]
    assert coverage == "12 of the decoder layers' 14 weight tensors pruned; left dense by design: 2 (router)"
    assert "Not fully pruned" not in text and "## Weights left dense" not in text
    assert "| Left dense | embeddings, LM head, MoE routers and gates |" in text


def test_moe_card_without_fallbacks_says_so():
    model = make_moe_model("mixtral")
    report = Pruner(WandaConfig()).prune_model(
        model, make_token_calibration(**CALIBRATION), show_progress=False, experts=ExpertOptions(min_tokens=0)
    )
    text = create_model_card(report).text
    _headings_have_content(text)
    section = _section(text, "Mixture of experts")
    assert "No expert fell back: each of the 16 experts was routed at least `min_tokens` = 0" in section
    assert "| Layer | Expert |" not in section


def test_allow_unpruned_card_names_every_dense_weight():
    model = make_moe_model("llama4")
    report = Pruner(WandaConfig()).prune_model(
        model, make_token_calibration(**CALIBRATION), show_progress=False, allow_unpruned=True
    )
    text = create_model_card(report).text
    _headings_have_content(text)
    # The warning comes before anything else in the body.
    notice = text.index("> **Not fully pruned.** 4 weight tensors of the decoder layers")
    assert notice < text.index("## What was done")
    rows = _rows(_section(text, "Weights left dense"), "Weight")
    assert [row[0].strip("`") for row in rows] == report.unpruned_weights
    shapes = {e.name: " × ".join(map(str, e.shape)) for e in report.coverage.unreachable}
    assert all(row[1] == shapes[row[0].strip("`")] for row in rows)
    assert all("Llama4TextExperts" in row[2] for row in rows)
    facts = _section(text, "What was done")
    coverage = next(row for row in _rows(facts, "|") if row[0] == "Coverage")[1]
    assert "**4 unreachable, left dense** (`allow_unpruned=True`)" in coverage
    achieved = next(row for row in _rows(facts, "|") if row[0] == "Achieved sparsity")[1]
    pruned = len(report.module_sparsity)
    # Each left-dense experts tensor [4, out, in] counts as 4 matrices.
    assert f"{pruned + 16} weight matrices" in achieved and "16 of them left dense" in achieved
    assert f"{100 * report.achieved_sparsity:.1f}%" in achieved
    assert "## Mixture of experts" not in text  # Llama 4's experts were not calibrated: nothing to report


def _headings(text: str) -> list[str]:
    return re.findall(r"^## .*$", text, flags=re.MULTILINE)


def test_dense_model_card_has_no_moe_or_left_dense_sections():
    model = make_model("llama")
    report = Pruner(WandaConfig()).prune_model(
        copy.deepcopy(model), make_token_calibration(**CALIBRATION), show_progress=False
    )
    text = create_model_card(report).text
    _headings_have_content(text)
    assert _headings(text) == [
        "## What was done",
        "## Calibration data",
        "## Evaluation",
        "## Sparsity per layer",
        "## How to use",
        "## Limitations",
        "## Citation",
    ]
    assert "Not fully pruned" not in text and "expert" not in text.lower()
    facts = _section(text, "What was done")
    coverage = next(row for row in _rows(facts, "|") if row[0] == "Coverage")[1]
    n = len(report.coverage.entries)
    assert coverage == f"{n} of the decoder layers' {n} weight tensors pruned"
    assert f"of {len(report.module_sparsity)} weight matrices in 3 decoder layers |" in text


def test_old_report_card_without_coverage_is_unchanged_but_for_the_wording():
    model = tiny_llama(seed=3, layers=2)
    report = make_report(model, ["en", "sw"], method="wanda")
    assert report.coverage is None and not report.experts
    text = create_model_card(report).text
    assert "| Coverage |" not in text and "## Mixture of experts" not in text
    assert f"of {len(report.module_sparsity)} weight matrices in 2 decoder layers |" in text


def _synthetic_moe_report(layers: int, experts: int, languages: list[str]) -> PruningReport:
    """A report as a 128-expert model's run writes it (shares and tokens made up, shapes tiny)."""
    generator = torch.Generator().manual_seed(0)
    records = {}
    for layer in range(layers):
        tokens = torch.randint(0, 40, (experts,), generator=generator).tolist()
        shares = {}
        for lang in languages:
            counts = torch.rand(experts, generator=generator) ** 4
            shares[lang] = (counts / counts.sum()).tolist()
        records[f"model.layers.{layer}.mlp.experts"] = {
            "num_experts": experts,
            "tokens": tokens,
            "fallback": [t < 16 for t in tokens],
            "routing_shares": shares,
        }
    return PruningReport(
        method="wanda",
        config=WandaConfig().to_dict(),
        target_sparsity=0.5,
        module_sparsity={f"model.layers.{i}.self_attn.q_proj": 0.5 for i in range(layers)},
        module_shapes={f"model.layers.{i}.self_attn.q_proj": [8, 8] for i in range(layers)},
        languages=languages,
        token_counts=dict.fromkeys(languages, 100),
        experts=records,
        expert_options={"router_weighted": True, "calibrate_all_experts": False, "min_tokens": 16},
    )


def test_128_expert_card_is_bounded_and_says_what_it_left_out():
    languages = ["en", "sw", "yo", "fr", "de"]
    report = _synthetic_moe_report(layers=48, experts=128, languages=languages)
    fallen = sum(len(v) for v in report.expert_fallbacks.values())
    assert fallen > MAX_EXPERT_ROWS
    text = create_model_card(report).text
    section = _section(text, "Mixture of experts")
    settings = {row[0]: row[1] for row in _rows(section, "Setting")}
    assert settings["`router_weighted`"] == "True"
    assert "inputs scaled by each token's router weight" in section
    assert len(_rows(section, "Layer | Expert")) == MAX_EXPERT_ROWS
    assert (
        f"The first {MAX_EXPERT_ROWS} of {fallen:,} fallback experts are shown; {fallen - MAX_EXPERT_ROWS:,} "
        "are left out here (all are in `pruning_report.json`)."
    ) in section
    assert len(_rows(section, "Language | Code")) == 5
    assert "Fallback experts per layer: 0: " in section
    per_layer = ", ".join(
        f"{i}: {len(report.expert_fallbacks[f'model.layers.{i}.mlp.experts'])}" for i in range(48)
    )
    assert f"Fallback experts per layer: {per_layer}." in section
    detail = _rows(section, "Layer | Language")
    shown = spread(48, MAX_EXPERT_ROWS // 5)
    assert shown[0] == 0 and shown[-1] == 47 and len(shown) == 8
    assert spread(3, 8) == [0, 1, 2] and spread(5, 1) == [0]
    assert [row[0] for row in detail] == [str(i) for i in shown for _ in range(5)]  # whole layers
    assert "8 of 48 MoE layers are shown, evenly spaced over the depth; the other 40 are left out" in section
    assert len(text) < 20_000


def test_calibrate_all_experts_card_says_the_threshold_did_not_apply():
    report = _synthetic_moe_report(layers=2, experts=4, languages=["en"])
    report.expert_options["calibrate_all_experts"] = True
    for record in report.experts.values():
        record["fallback"] = [False] * 4
    section = _section(create_model_card(report).text, "Mixture of experts")
    assert "every expert calibrated on every token (the layer output kept the real routing)" in section
    assert "with `calibrate_all_experts` every expert was calibrated on every token" in section
    assert "was routed at least" not in section


def test_user_strings_in_the_new_sections_are_escaped():
    report = _synthetic_moe_report(layers=1, experts=4, languages=["en"])
    # Two experts modules in one layer: labelled by name, which must stay one table cell.
    record = report.experts["model.layers.0.mlp.experts"]
    report.experts["model.layers.0.mlp.odd|experts*"] = copy.deepcopy(record)
    report.coverage = CoveragePlan(
        [
            CoverageEntry("model.layers.0.self_attn.q_proj.weight", (8, 8), PRUNED),
            CoverageEntry("model.layers.0.norm.weight", (8, 8), DENSE, "norm"),
            CoverageEntry(
                "model.layers.0.mlp.experts.down_proj", (4, 8, 8), PRUNED, "ignored: 1 of 4 experts"
            ),
            CoverageEntry("model.layers.0.mixer.table|x", (2, 8, 8), UNREACHABLE, "Odd*Mixer.table | x [y]"),
        ],
        allow_unpruned=True,
    )
    text = create_model_card(report).text
    _headings_have_content(text)
    assert (
        "| Coverage | 2 of the decoder layers' 4 weight tensors pruned (1 of them only partly: some experts "
        "ignored); left dense by design: 1 (norm); **1 unreachable, left dense** (`allow_unpruned=True`) |"
    ) in text
    left = _rows(_section(text, "Weights left dense"), "Weight")
    assert left == [
        ["<code>model.layers.0.mixer.table&#124;x</code>", "2 × 8 × 8", r"Odd\*Mixer.table \| x \[y\]"]
    ]
    detail = _rows(_section(text, "Mixture of experts"), "Layer | Language")
    assert [row[0] for row in detail] == [
        "`model.layers.0.mlp.experts`",
        "<code>model.layers.0.mlp.odd&#124;experts*</code>",
    ]
    assert all(len(row) == 4 for row in detail)
