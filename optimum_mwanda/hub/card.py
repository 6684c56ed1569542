"""Model cards for pruned models: metadata (languages, base model, licence, tags, per-language perplexity as
``model-index`` results) and a body rendered from ``model_card_template.md``, plus the per-layer sparsity plot.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..calibration.languages import Language, normalize_language_tag, resolve_language, resolve_languages
from ..distributed import main_process_only
from ..evaluation.summary import MEAN_LABEL, geometric_mean
from ..methods import describe_method
from ..methods.registry import MethodDescription, method_entry, method_names
from ..modeling.coverage import CoveragePlan
from ..modeling.experts import FALLBACK_RULE
from ..report import PruningReport
from .identity import base_model_id, hub_ids, validate_repo_id
from .verification import group_by_layer

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
CITATIONS_PATH = Path(__file__).with_name("citations.json")
PLOT_FILENAME = "sparsity_per_layer.png"


@dataclass(frozen=True)
class Citation:
    key: str
    text: str
    bibtex: str


@cache
def _load_citations() -> dict[str, Citation]:
    """The references a card may cite, from ``citations.json`` beside this module (BibTeX stays data)."""
    data = json.loads(CITATIONS_PATH.read_text(encoding="utf-8"))
    return {name: Citation(**entry) for name, entry in data.items()}


# -- small pure helpers ----------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _ppl(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.2f}" if value < 1e4 else f"{value:.3g}"


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "–"
    return f"{100 * (after - before) / before:+.1f}%"


def _setting_text(value: Any) -> str:
    """``{"en": 8, "sw": 8}`` -> ``"8 per language"``; ``{"en": 8, "sw": 6}`` -> ``"en 8, sw 6"``."""
    if isinstance(value, dict):
        if len(set(value.values())) == 1:
            return f"{next(iter(value.values()))} per language"
        return ", ".join(f"{key} {item}" for key, item in value.items())
    return str(value)


def _check_eval_results(eval_results: dict[str, Any] | None) -> dict[str, Any]:
    if eval_results is None:
        return {}
    if not isinstance(eval_results, dict):
        raise TypeError("eval_results must be {'before': {lang: ppl}, 'after': {lang: ppl}}")
    unknown = sorted(set(eval_results) - {"before", "after", "downstream"})
    if unknown:
        raise ValueError(
            f"eval_results keys must be 'before' and/or 'after' (perplexities) and 'downstream' (lm-eval "
            f"scores), got {unknown}"
        )
    checked: dict[str, Any] = {}
    for stage, values in eval_results.items():
        if stage == "downstream":
            checked[stage] = _check_downstream(values)
            continue
        if not isinstance(values, dict):
            raise TypeError(f"eval_results[{stage!r}] must map language codes to perplexities")
        checked[stage] = {}
        for lang, value in values.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ValueError(
                    f"eval_results[{stage!r}][{lang!r}] must be a positive finite perplexity, got {value!r}"
                )
            try:
                tag = normalize_language_tag(lang)
            except (TypeError, ValueError) as err:
                raise ValueError(f"eval_results[{stage!r}]: {err}") from None
            if tag in checked[stage] and checked[stage][tag] != float(value):
                raise ValueError(f"eval_results[{stage!r}] gives two perplexities for language {tag!r}")
            checked[stage][tag] = float(value)
    return checked


def _check_downstream(values: Any) -> dict[str, dict[str, float]]:
    """``eval_results["downstream"]``: lm-eval scores ``{task: {metric: value}}``, e.g. from
    ``DownstreamResult.eval_results()``."""
    if not isinstance(values, dict):
        raise TypeError("eval_results['downstream'] must map task names to {metric: value}")
    checked: dict[str, dict[str, float]] = {}
    for task, metrics in values.items():
        if not isinstance(metrics, dict):
            raise TypeError(f"eval_results['downstream'][{task!r}] must map metric names to numbers")
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"eval_results['downstream'][{task!r}][{metric!r}] must be a finite number, got {value!r}"
                )
        checked[str(task)] = {str(m): float(v) for m, v in metrics.items()}
    return checked


def achieved_layer_sparsity(report: PruningReport) -> dict[int, float]:
    """Achieved sparsity per decoder layer, from the report's per-module sparsity and shapes."""
    numel = {name: int(math.prod(report.module_shapes.get(name, [1, 1]))) for name in report.module_sparsity}
    return group_by_layer(report.module_sparsity, numel)


def _license_from_local_card(reference: str | None) -> str | None:
    """The licence in the base model's card when it is on this machine (a local folder or the HF cache)."""
    if not reference:
        return None
    candidates = []
    if os.path.isdir(reference):
        candidates.append(os.path.join(reference, "README.md"))
    else:
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(reference, "README.md")
        except Exception:  # an invalid repo id or an unreadable cache: no local card
            cached = None
        if isinstance(cached, str):
            candidates.append(cached)
    for path in candidates:
        if os.path.isfile(path):
            try:
                found = ModelCard.load(path, ignore_metadata_errors=True).data.license
            except Exception:  # a malformed card just means "licence unknown"
                continue
            if found:
                return str(found)
    return None


# -- plot ------------------------------------------------------------------------------------------------
@main_process_only  # data-parallel runs: rank 0 writes, the others wait for it
def plot_layer_sparsity(report: PruningReport, path: str | os.PathLike) -> Path:
    """Write a PNG bar chart of achieved sparsity per decoder layer (with the target schedule) to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)  # headless: never needs a display
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    achieved = achieved_layer_sparsity(report)
    layers = sorted(set(achieved) | set(range(len(report.layer_sparsity))))
    if not layers:
        raise ValueError("the report has no per-layer or per-module sparsity to plot")
    figure = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2.0), 3.6), dpi=110)
    axes = figure.subplots()
    axes.bar(layers, [100 * achieved.get(i, float("nan")) for i in layers], color="#4c72b0", label="achieved")
    if report.layer_sparsity:
        axes.plot(
            range(len(report.layer_sparsity)),
            [100 * s for s in report.layer_sparsity],
            color="#dd8452",
            marker="o",
            markersize=3,
            linewidth=1.5,
            label="target",
        )
    axes.axhline(100 * report.target_sparsity, color="grey", linestyle="--", linewidth=1, label="mean target")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("sparsity (%)")
    top = max(
        [
            100 * report.target_sparsity,
            *(100 * v for v in achieved.values()),
            *(100 * s for s in report.layer_sparsity),
        ]
    )
    axes.set_ylim(0, min(100.0, top * 1.25 + 1))
    method = method_entry(report.method).title if report.method in method_names() else report.method
    schedule = {"owl": "OWL", "cwl": "CWL", "depth": "depth"}.get(report.config.layerwise, "uniform")
    axes.set_title(f"{method}: sparsity per layer ({schedule} schedule)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


# -- card ------------------------------------------------------------------------------------------------
# -- escaping: every user string is escaped where it lands ------------------------------------------------
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_\[\]|~])")


def markdown_text(value: object) -> str:
    """``value`` as inline Markdown text that renders literally: one line, HTML escaped, Markdown
    punctuation (``|``, ``*``, ``[``, backticks, ...) backslash-escaped. Safe in a table cell and a heading."""
    text = " ".join(str(value).split())  # newlines (and runs of blanks) end a table row or a heading
    text = html.escape(text, quote=False)
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)


_PLAIN_CODE = re.compile(r"[\w.*?:/@+=, -]+")


def markdown_code(value: object) -> str:
    """``value`` as inline code that is safe in a table cell: ``<code>`` with HTML escaped (a backslash does
    not escape inside a Markdown code span, so ``|`` becomes its character reference)."""
    text = " ".join(str(value).split())
    if _PLAIN_CODE.fullmatch(text):
        return f"`{text}`"
    return "<code>" + html.escape(text, quote=False).replace("|", "&#124;") + "</code>"


def _row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


@dataclass
class CardTable:
    """A Markdown table for the template: intro line, header, alignment and rows, every cell escaped."""

    intro: str
    header: str
    align: str
    rows: list[str] = field(default_factory=list)


@dataclass
class CardSection:
    """An optional section: the template renders its heading only for the sections the card data lists, so
    a model without the subject (a dense model has no experts) gets no empty heading."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[CardTable] = field(default_factory=list)


def _setting_value(value: Any) -> str:
    """A resolved setting for the card; never a raw ``None`` (an old report's automatic choice)."""
    if value is None:
        return "auto"
    if isinstance(value, Mapping):  # the Hessian token stride per input width
        by_stride: dict[Any, list[str]] = {}
        for width, stride in value.items():
            by_stride.setdefault(stride, []).append(str(width))
        return "auto: " + "; ".join(
            f"{stride} for {' / '.join(widths)}-feature inputs"
            for stride, widths in sorted(by_stride.items(), reverse=True)
        )
    return markdown_text(value)


# -- card data ---------------------------------------------------------------------------------------------
@dataclass
class PrunedModelCardData:
    """Everything the card body shows, built in Python and escaped (the template only loops over it).

    Follows ``huggingface_hub.ModelCardData``: plain attributes, :meth:`to_dict` for the template.
    """

    title: str
    summary: str
    notices: list[str]
    facts: CardTable
    method_text: str
    left_dense: list[CardSection]
    calibration: CardTable
    experts: list[CardSection]
    evaluation: list[CardTable]
    layers: CardTable
    plots: list[str]
    usage: list[str]
    limitations: list[str]
    citations: list[Citation]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_COMPRESSED_NOTICE = (
    "**Checkpoint format.** The weights are stored in optimum-mwanda's compressed bitmask format "
    "(`*.sparse.safetensors`: one packed bit per weight plus the non-zero values), about half the dense size "
    "at 50% sparsity. Plain `transformers` **cannot** load it (`from_pretrained` finds no "
    "`model.safetensors`); load it with `optimum_mwanda.load_pruned_model` as shown below."
)


def _usage(model_ref: str, achieved: float, compressed: bool) -> list[str]:
    if compressed:
        return [
            "```python\n# pip install optimum-mwanda\nfrom optimum_mwanda import load_pruned_model, "
            "verify_sparsity\nfrom transformers import AutoTokenizer\n\n"
            f'model = load_pruned_model("{model_ref}")  # restores the dense weights from the bitmask format\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{model_ref}")\n'
            f"print(verify_sparsity(model).overall)  # {achieved:.3f}\n```"
        ]
    return [
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{model_ref}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{model_ref}")\n'
        'inputs = tokenizer("Hello, my name is", return_tensors="pt")\n'
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=30)[0]))\n```",
        "The pruned weights are stored as exact zeros in a standard safetensors checkpoint. To check them:",
        "```python\nfrom optimum_mwanda import verify_sparsity\n\n"
        f"print(verify_sparsity(model).overall)  # {achieved:.3f}\n```",
    ]


def _facts(
    report: PruningReport,
    description: MethodDescription,
    base_model: str | None,
    achieved: float,
    n_layers: int,
) -> CardTable:
    config = report.config
    nm = config.nm_structure
    mask = "unstructured (per output row)"
    if nm is not None:
        mask = f"{nm[0]}:{nm[1]} (at most {nm[0]} non-zeros in every {nm[1]} consecutive input weights)"
    origin = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "not recorded"
    left_dense = "embeddings, LM head"
    if report.coverage is not None and "router" in report.coverage.reasons():
        left_dense += ", MoE routers and gates"
    left_dense += "".join(f", {markdown_code(p)}" for p in config.ignore)
    rows = [
        _row("Method", f"{markdown_text(description.title)} ({markdown_text(description.summary)})"),
        _row("Base model", origin),
        _row("Target sparsity", _pct(report.target_sparsity)),
        _row("Achieved sparsity", _achieved_text(report, achieved, n_layers)),
    ]
    if report.coverage is not None:
        rows.append(_row("Coverage", _coverage_text(report.coverage)))
    rows.append(_row("Mask structure", mask))
    for part in description.parts:
        text = markdown_text(part.name if part.role != "layer schedule" else part.summary)
        if part.role == "layer schedule" and part.name != "uniform":
            text += f", layer sparsities within ±{_pct(part.settings.get('layerwise_range'))} of the target"
        rows.append(
            _row(part.role.capitalize() if part.role != "layer schedule" else "Layer-wise schedule", text)
        )
    rows.append(_row("Left dense", left_dense))
    for part in description.parts:
        for key, value in part.settings.items():
            if part.role == "layer schedule" and key == "layerwise_range":
                continue
            rows.append(_row(markdown_code(key), _setting_value(value)))
    for key, value in report.calibration_settings.items():
        rows.append(_row(markdown_code(f"calibration {key}"), markdown_text(_setting_text(value))))
    rows.append(_row("Tool", f"optimum-mwanda {markdown_text(report.optimum_mwanda_version)}"))
    return CardTable("", "| | |", "|---|---|", rows)


# -- coverage and mixture of experts ------------------------------------------------------------------------
_EXPERT_MATRIX = re.compile(r"\[\d+\]$")
#: at most this many rows per table of the experts section (a 128-expert model has thousands of experts)
MAX_EXPERT_ROWS = 40
#: the most-routed experts shown per layer and language
TOP_EXPERTS = 3


def _matrices(shape: tuple[int, ...]) -> int:
    """Weight matrices in a parameter: one per expert of a 3-D experts tensor (``[E, out, in]``)."""
    return math.prod(shape[:-2]) if len(shape) > 2 else 1


def _achieved_text(report: PruningReport, achieved: float, n_layers: int) -> str:
    """``50.0% of the weights of 40 weight matrices (32 of them expert matrices, ...) in 2 decoder layers``:
    every expert's matrix counts as one matrix, as :attr:`PruningReport.achieved_sparsity` weighs them."""
    unreachable = [] if report.coverage is None else report.coverage.unreachable
    n_dense = sum(_matrices(entry.shape) for entry in unreachable)
    n_experts = sum(1 for name in report.module_sparsity if _EXPERT_MATRIX.search(name))
    text = f"{_pct(achieved)} of the weights of {len(report.module_sparsity) + n_dense:,} weight matrices"
    notes = []
    if n_experts:
        notes.append(f"{n_experts:,} of them expert matrices, counted one per expert and projection")
    if n_dense:
        notes.append(f"{n_dense:,} of them left dense, unreachable by the method: see *Weights left dense*")
    if notes:
        text += f" ({'; '.join(notes)})"
    return f"{text} in {n_layers} decoder layers"


def _coverage_text(plan: CoveragePlan) -> str:
    """Every >= 2-D parameter of the decoder layers: how many pruned, left dense by reason, unreachable."""
    pruned = plan.pruned
    partly = sum(1 for entry in pruned if entry.reason)
    text = f"{len(pruned):,} of the decoder layers' {len(plan.entries):,} weight tensors pruned"
    if partly:
        text += f" ({partly:,} of them only partly: some experts ignored)"
    by_design = {reason: n for reason, n in plan.reasons().items() if reason != "unreachable"}
    if by_design:
        listed = ", ".join(f"{n:,} ({markdown_text(reason)})" for reason, n in sorted(by_design.items()))
        text += f"; left dense by design: {listed}"
    if plan.unreachable:
        text += f"; **{len(plan.unreachable):,} unreachable, left dense** (`allow_unpruned=True`)"
    return text


def _unpruned_parts(report: PruningReport) -> tuple[list[str], list[CardSection]]:
    """The warning at the top of the card and the section naming every weight left dense because the method
    could not reach it (``allow_unpruned=True``): a card never looks fully pruned over dense weights."""
    if report.coverage is None or not report.coverage.unreachable:
        return [], []
    entries = report.coverage.unreachable
    dense = sum(entry.numel for entry in entries)
    pruned = sum(math.prod(shape) for shape in report.module_shapes.values())
    share = dense / (dense + pruned) if dense + pruned else 0.0
    notice = (
        f"**Not fully pruned.** {len(entries):,} weight tensor{'s' if len(entries) != 1 else ''} of the decoder "
        f"layers ({_pct(share)} of the weights this run was to prune) could not be reached by the method and "
        "{verb} left dense (`allow_unpruned=True`). The achieved sparsity counts them as dense; every one is "
        "named under *Weights left dense*."
    ).format(verb="were" if len(entries) != 1 else "was")
    table = CardTable(
        "Every decoder-layer weight the method could not reach, left dense by `allow_unpruned=True` "
        "(counted, dense, in the achieved sparsity):",
        "| Weight | Shape | Reason |",
        "|---|---|---|",
        [
            _row(
                markdown_code(entry.name),
                " × ".join(str(size) for size in entry.shape),
                markdown_text(entry.reason),
            )
            for entry in entries
        ],
    )
    return [notice], [CardSection("Weights left dense", tables=[table])]


def _block_labels(names: list[str]) -> dict[str, str]:
    """A short label per experts module: its decoder layer's index, or its name where a layer has several."""
    layers = {}
    for name in names:
        match = re.search(r"\.(\d+)\.", name)
        layers[name] = match.group(1) if match else None
    counts: dict[str | None, int] = {}
    for layer in layers.values():
        counts[layer] = counts.get(layer, 0) + 1
    return {
        name: layer if layer is not None and counts[layer] == 1 else markdown_code(name)
        for name, layer in layers.items()
    }


def _left_out(shown: int, total: int, what: str) -> str:
    if shown >= total:
        return ""
    return (
        f" The first {shown:,} of {total:,} {what} are shown; {total - shown:,} are left out here (all are in "
        "`pruning_report.json`)."
    )


def spread(total: int, count: int) -> list[int]:
    """``count`` indices of ``range(total)`` evenly spaced from the first to the last (all when fewer)."""
    if count >= total:
        return list(range(total))
    if count <= 1:
        return [0]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


def _expert_settings_table(report: PruningReport) -> CardTable:
    options = report.expert_options
    weighted = options.get("router_weighted", False)
    everyone = options.get("calibrate_all_experts", False)
    rows = [
        _row(
            "`router_weighted`",
            markdown_text(weighted),
            "inputs scaled by each token's router weight"
            if weighted
            else "plain inputs, not scaled by the router weight",
        ),
        _row(
            "`calibrate_all_experts`",
            markdown_text(everyone),
            "every expert calibrated on every token (the layer output kept the real routing)"
            if everyone
            else "each expert calibrated on the tokens routed to it",
        ),
        _row(
            "`min_tokens`",
            markdown_text(options.get("min_tokens", "–")),
            "an expert routed fewer calibration tokens falls back to the rule below",
        ),
    ]
    return CardTable(
        "How the experts were calibrated (`ExpertOptions`):",
        "| Setting | Value | Meaning |",
        "|---|---|---|",
        rows,
    )


def _fallback_table(report: PruningReport, labels: dict[str, str]) -> CardTable:
    total = sum(len(record.get("fallback", [])) for record in report.experts.values())
    fallen = [
        (name, expert, report.experts[name].get("tokens", []))
        for name, experts in report.expert_fallbacks.items()
        for expert in experts
    ]
    minimum = markdown_text(report.expert_options.get("min_tokens", "–"))
    if not fallen and report.expert_options.get("calibrate_all_experts", False):
        return CardTable(
            "No expert fell back: with `calibrate_all_experts` every expert was calibrated on every token, so "
            "`min_tokens` did not apply.",
            "",
            "",
        )
    if not fallen:
        return CardTable(
            f"No expert fell back: each of the {total:,} experts was routed at least `min_tokens` = {minimum} "
            "calibration tokens.",
            "",
            "",
        )
    rows = [
        _row(
            labels[name],
            str(expert),
            f"{tokens[expert]:,}" if expert < len(tokens) else "–",
            "every token of its MoE block",
        )
        for name, expert, tokens in fallen[:MAX_EXPERT_ROWS]
    ]
    left = _left_out(len(rows), len(fallen), "fallback experts")
    if left:  # one count per MoE layer keeps the whole picture when rows are left out
        left += (
            " Fallback experts per layer: "
            + ", ".join(
                f"{labels[name]}: {len(experts)}" for name, experts in report.expert_fallbacks.items()
            )
            + "."
        )
    return CardTable(
        f"{len(fallen):,} of {total:,} experts were routed fewer than `min_tokens` = {minimum} calibration "
        f"tokens and fell back to the stated rule: each was {FALLBACK_RULE}." + left,
        "| Layer | Expert | Tokens routed | Calibrated on |",
        "|---:|---:|---:|---|",
        rows,
    )


def _routing_tables(
    report: PruningReport, languages: dict[str, Language], labels: dict[str, str]
) -> list[CardTable]:
    """Per calibration language: a summary over the MoE layers, then per layer its busiest experts."""
    shares = report.routing_shares
    ordered = [lang for lang in dict.fromkeys([*report.languages, *shares]) if lang in shares]
    if not ordered:
        return []

    def name_of(lang: str) -> str:
        return markdown_text(languages[lang].name if lang in languages else lang)

    summary_rows = []
    layer_rows: list[list[str]] = []  # per experts module, one row per language
    modules = [name for name in report.experts if any(name in shares[lang] for lang in ordered)]
    for lang in ordered:
        busiest, used = [], []
        for name in modules:
            values = shares[lang].get(name, [])
            if values and sum(values) > 0:
                busiest.append(max(values))
                used.append(sum(1 for v in values if v > 1 / len(values)))
        n_experts = {len(shares[lang][name]) for name in modules if name in shares[lang]}
        of = f" of {n_experts.pop()}" if len(n_experts) == 1 else ""
        summary_rows.append(
            _row(
                name_of(lang),
                markdown_code(lang),
                _pct(sum(busiest) / len(busiest)) if busiest else "–",
                _pct(max(busiest)) if busiest else "–",
                f"{sum(used) / len(used):.1f}{of}" if used else "–",
            )
        )
    for name in modules:
        rows = []
        for lang in ordered:
            values = shares[lang].get(name)
            if not values or sum(values) <= 0:
                rows.append(_row(labels[name], name_of(lang), "no routed tokens", "–"))
                continue
            top = sorted(range(len(values)), key=lambda e: (-values[e], e))[:TOP_EXPERTS]
            rows.append(
                _row(
                    labels[name],
                    name_of(lang),
                    ", ".join(f"{e} ({_pct(values[e])})" for e in top),
                    f"{sum(1 for v in values if v > 1 / len(values))} of {len(values)}",
                )
            )
        layer_rows.append(rows)
    # Whole layers only (every shown layer has all its languages), spread over the depth of the model.
    shown = spread(len(layer_rows), max(1, MAX_EXPERT_ROWS // max(1, len(ordered))))
    detail = [row for index in shown for row in layer_rows[index]]
    left = ""
    if len(shown) < len(layer_rows):
        left = (
            f" {len(shown)} of {len(layer_rows)} MoE layers are shown, evenly spaced over the depth; the other "
            f"{len(layer_rows) - len(shown)} are left out here (all are in `pruning_report.json`)."
        )
    return [
        CardTable(
            "Which experts serve which language: the share of each calibration language's routed (token, "
            "expert) assignments that went to an expert, counted during calibration. A uniform router gives "
            "every expert 1/E; the busiest expert's share and the number of experts above 1/E show how "
            "concentrated a language's routing is (averaged over the MoE layers here).",
            "| Language | Code | Busiest expert's share (mean) | Busiest expert's share (max) | Experts above 1/E (mean) |",
            "|---|---|---:|---:|---:|",
            summary_rows,
        ),
        CardTable(
            f"Per MoE layer and language, the {TOP_EXPERTS} most-routed experts with their share." + left,
            "| Layer | Language | Top experts (share) | Experts above 1/E |",
            "|---:|---|---|---:|",
            detail,
        ),
    ]


def _experts_sections(report: PruningReport, languages: dict[str, Language]) -> list[CardSection]:
    """The mixture-of-experts section (none for a dense model): expert settings, the experts that fell back
    to the stated rule, and which experts each calibration language was routed to."""
    if not report.experts:
        return []
    labels = _block_labels(list(report.experts))
    counts = {record.get("num_experts", len(record.get("tokens", []))) for record in report.experts.values()}
    each = f" of {counts.pop()} experts each" if len(counts) == 1 else ""
    intro = (
        f"{len(report.experts)} mixture-of-experts block{'s' if len(report.experts) != 1 else ''}{each}: every "
        "expert's matrices were pruned to the target with their own statistics; routers and shared-expert "
        "gates were left dense."
    )
    return [
        CardSection(
            "Mixture of experts",
            paragraphs=[intro],
            tables=[
                _expert_settings_table(report),
                _fallback_table(report, labels),
                *_routing_tables(report, languages, labels),
            ],
        )
    ]


def _method_text(report: PruningReport, description: MethodDescription) -> str:
    nm = report.config.nm_structure
    where = f"in every group of {nm[1]} consecutive input weights" if nm else "of every output row"
    update = next((p for p in description.parts if p.role == "weight update"), None)
    changed = "" if update is None or update.name == "none" else f" ({description.title}: {update.summary})"
    # (the titles and summaries are the registered methods' own text, not user input)
    return (
        "Pruning is one-shot: a small calibration set is run through the model, each weight gets an importance "
        f"score, and the lowest-scoring weights {where} are set to exactly zero. No weight was retrained"
        f"{changed}."
    )


def _evaluation_tables(
    report: PruningReport,
    languages: dict[str, Language],
    evals: dict[str, Any],
    eval_dataset: str | None,
) -> list[CardTable]:
    before, after = evals.get("before", {}), evals.get("after", {})
    tables = []
    eval_langs = [
        lang
        for lang in dict.fromkeys([*report.languages, *before, *after])
        if lang in before or lang in after
    ]
    if eval_langs:
        rows = [
            _row(
                markdown_text(languages[lang].name),
                f"`{lang}`",
                _ppl(before.get(lang)),
                _ppl(after.get(lang)),
                _change(before.get(lang), after.get(lang)),
            )
            for lang in eval_langs
        ]
        both = [lang for lang in eval_langs if lang in before and lang in after]
        if len(both) > 1:
            mean_before = geometric_mean(before[x] for x in both)
            mean_after = geometric_mean(after[x] for x in both)
            label = MEAN_LABEL[0].upper() + MEAN_LABEL[1:]
            rows.append(
                _row(
                    f"**{label}**", "", _ppl(mean_before), _ppl(mean_after), _change(mean_before, mean_after)
                )
            )
        on = f" on {markdown_text(eval_dataset)}" if eval_dataset else ""
        tables.append(
            CardTable(
                f"Perplexity per language{on} (lower is better).",
                "| Language | Code | Before pruning | After pruning | Change |",
                "|---|---|---:|---:|---:|",
                rows,
            )
        )
    downstream = evals.get("downstream", {})
    if downstream:
        rows = [_row(markdown_code(task), _scores_text(metrics)) for task, metrics in downstream.items()]
        tables.append(
            CardTable(
                "Downstream tasks (lm-evaluation-harness; `acc` in [0, 1], chance 0.25 on the 4-way "
                "`mwanda_continuation_*` tasks; `chrf` in [0, 100]; ± one standard error where lm-eval gave it):",
                "| Task | Scores |",
                "|---|---|",
                rows,
            )
        )
    if not tables:
        tables.append(CardTable("No evaluation results were recorded for this checkpoint.", "", "", []))
    return tables


def _scores_text(metrics: Mapping[str, float]) -> str:
    """``acc 0.550 ± 0.050, chrf 31.2``: each metric with its ``<metric>_stderr`` when given."""
    parts = []
    for metric, value in metrics.items():
        if metric.endswith("_stderr") and metric[: -len("_stderr")] in metrics:
            continue
        stderr = metrics.get(f"{metric}_stderr")
        text = (
            f"{markdown_text(metric)} {value:.3f}"
            if stderr is not None
            else f"{markdown_text(metric)} {value:.4g}"
        )
        if stderr is not None:
            text += f" ± {stderr:.3f}"
        parts.append(text)
    return ", ".join(parts)


def _stderr_results(
    downstream: Mapping[str, Mapping[str, float]], entries: list[dict[str, Any]]
) -> list[EvalResult]:
    """A ``<metric>_stderr`` model-index result beside each lm-eval score that has a standard error."""
    results = []
    for entry in entries:
        metric, task = entry["metric_type"], entry["dataset_type"]
        stderr = downstream.get(task, {}).get(f"{metric}_stderr")
        if stderr is None:
            continue
        results.append(
            EvalResult(
                **{
                    **entry,
                    "metric_type": f"{metric}_stderr",
                    "metric_name": f"{metric} standard error ({task})",
                    "metric_value": round(float(stderr), 4),
                }
            )
        )
    return results


def _layer_table(report: PruningReport) -> tuple[CardTable, int]:
    achieved_layers = achieved_layer_sparsity(report)
    n_layers = max(len(report.layer_sparsity), len(achieved_layers))
    rows = [
        _row(
            str(i),
            _pct(report.layer_sparsity[i]) if i < len(report.layer_sparsity) else "–",
            _pct(achieved_layers.get(i)),
        )
        for i in range(n_layers)
    ]
    return CardTable("", "| Layer | Target | Achieved |", "|---:|---:|---:|", rows), n_layers


def _card_citations(
    report: PruningReport, description: MethodDescription, languages: list[Language]
) -> list[Citation]:
    keys = list(description.citations)
    # Language-specific calibration (Kurz et al.): anything but an English-only calibration set.
    if [lang.code for lang in languages] not in ([], ["en"], ["eng"]):
        keys.append("kurz")
    sources = " ".join(report.calibration_sources.values()).lower()
    if "translation" in sources or report.negative_calibration_tokens > 0:
        keys.append("kim")
    if report.method == "mwanda" and "wanda" not in keys:
        keys.append("wanda")  # M-Wanda extends Wanda's score, also when its sweep chose the mask
    citations = _load_citations()
    return [citations[key] for key in dict.fromkeys(keys) if key in citations]


def build_card_data(
    report: PruningReport,
    languages: dict[str, Language],
    base_model: str | None,
    evals: dict[str, Any],
    model_name: str,
    model_ref: str,
    plot_file: str | None,
    compressed: bool,
    eval_dataset: str | None,
) -> PrunedModelCardData:
    """The card body's data: every value explicit and escaped where it lands."""
    description = describe_method(report.config.resolve())
    achieved = report.achieved_sparsity
    layers, n_layers = _layer_table(report)
    nm = report.config.nm_structure
    n_langs = len(report.languages)
    lang_phrase = (
        f"calibration text in {languages[report.languages[0]].name}"
        if n_langs == 1
        else f"calibration text in {n_langs} languages"
    )
    origin = (
        f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a causal language model"
    )
    structured = f" ({nm[0]}:{nm[1]} structured)" if nm else ""
    summary = (
        f"This is {origin} pruned one-shot to **{_pct(achieved)} sparsity** with "
        f"**{markdown_text(description.title)}**{structured}, using {markdown_text(lang_phrase)}. "
        "The pruned weights are exact zeros; the architecture and tokenizer are unchanged."
    )
    calibration = CardTable(
        f"{n_langs} language{'s' if n_langs != 1 else ''}, {sum(report.token_counts.values()):,} tokens in total.",
        "| Language | Code | Tokens | Source |",
        "|---|---|---:|---|",
        [
            _row(
                markdown_text(languages[lang].name),
                f"`{lang}`",
                f"{report.token_counts.get(lang, 0):,}",
                markdown_text(report.calibration_sources.get(lang, "–")),
            )
            for lang in report.languages
        ],
    )
    speed = (
        f"The {nm[0]}:{nm[1]} pattern can be accelerated by sparse tensor cores (e.g. NVIDIA Ampere and later) "
        "with a suitable runtime."
        if nm
        else "Unstructured sparsity needs a sparse runtime to turn into speed."
    )
    coverage = (
        "; this model was calibrated on one language only, so expect larger losses in the others"
        if n_langs == 1
        else ""
    )
    unpruned_notices, left_dense = _unpruned_parts(report)
    return PrunedModelCardData(
        title=f"{markdown_text(model_name.split('/')[-1])}: {markdown_text(description.title)}, "
        f"{_pct(achieved)} sparse",
        summary=summary,
        notices=[*unpruned_notices, *([_COMPRESSED_NOTICE] if compressed else [])],
        facts=_facts(report, description, base_model, achieved, n_layers),
        method_text=_method_text(report, description),
        left_dense=left_dense,
        calibration=calibration,
        experts=_experts_sections(report, languages),
        evaluation=_evaluation_tables(report, languages, evals, eval_dataset),
        layers=layers,
        plots=[f"![Sparsity per decoder layer]({plot_file})"] if plot_file else [],
        usage=_usage(model_ref, achieved, compressed),
        limitations=[
            "Zeros alone do not make inference faster or the model smaller in memory: dense kernels multiply "
            f"them like any other value. {speed}",
            "Pruning removes capacity. Quality drops most for languages, domains and tasks that the "
            f"calibration data did not cover{coverage}.",
            "Perplexity on a small held-out sample is a coarse signal; evaluate on your own task before "
            "deploying.",
            "The pruned model inherits the biases, limitations and licence of its base model.",
        ],
        citations=_card_citations(report, description, [languages[x] for x in report.languages]),
    )


def _model_index(
    evals: dict[str, Any], languages: dict[str, Language], eval_dataset: str | None
) -> list[EvalResult]:
    """One ``model-index`` result per language (perplexity after pruning), per lm-eval task and metric, and
    per standard error lm-eval gave (``<metric>_stderr``, as lm-eval names it)."""
    from ..evaluation.harness import model_index_results

    results = [
        EvalResult(
            task_type="text-generation",
            task_name="Language modelling",
            dataset_type=eval_dataset or "held-out-text",
            dataset_name=f"{eval_dataset or 'Held-out text'} ({languages[lang].name})",
            dataset_config=languages[lang].code,
            metric_type="perplexity",
            metric_name=f"Perplexity ({languages[lang].code})",
            metric_value=round(value, 4),
        )
        for lang, value in evals.get("after", {}).items()
    ]
    downstream = evals.get("downstream", {})
    entries = model_index_results(downstream)
    return results + [EvalResult(**entry) for entry in entries] + _stderr_results(downstream, entries)


def create_model_card(
    report: PruningReport,
    base_model: str | None = None,
    eval_results: dict[str, dict[str, float]] | None = None,
    model_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    plot_path: str | os.PathLike | None = None,
    *,
    compressed: bool = False,
    eval_dataset: str | None = None,
) -> ModelCard:
    """Build the model card of a pruned model.

    Args:
        report: the :class:`PruningReport` of the run.
        base_model: Hub id of the model that was pruned (``base_model:`` metadata and links).
        eval_results: ``{"before": {lang: ppl}, "after": {lang: ppl}}``; either may be missing. The ``after``
            perplexities become one ``model-index`` result per language.
        model_id: the Hub id this card will live under (used in the usage snippet and as the model-index name).
        license: licence identifier. When ``None`` it is read from the base model's card if that is on this
            machine (a local folder or the Hugging Face cache); otherwise left out.
        datasets: Hub dataset ids of the calibration data. Defaults to the report's calibration sources that
            are valid dataset ids.
        plot_path: where to write the per-layer sparsity PNG; the card links to it by file name (so keep it
            beside the card's ``README.md``). ``None``: no plot.
        compressed: the checkpoint uses the bitmask format (changes the usage notes).
        eval_dataset: a short description of the evaluation text, shown above the perplexity table.

    Raises:
        ValueError: an invalid language code (calibration or evaluation) or malformed ``eval_results``.
    """
    if not isinstance(report, PruningReport):
        raise TypeError(f"report must be a PruningReport, got {type(report).__name__}")
    evals = _check_eval_results(eval_results)
    tags = list(dict.fromkeys([*report.languages, *evals.get("before", {}), *evals.get("after", {})]))
    if not tags:
        raise ValueError("the report names no calibration language and eval_results none: the card needs one")
    resolved = resolve_languages(tags)  # every bad tag in one error
    languages = {tag: resolve_language(tag) for tag in tags}
    recorded = report.base_model
    if base_model is not None:
        validate_repo_id(base_model, "base_model")
    else:
        base_model = base_model_id(recorded)
    if license is None:
        # The recorded name_or_path may be a local copy of the base model whose card states the licence.
        license = _license_from_local_card(base_model) or _license_from_local_card(recorded)
    if datasets is None:
        datasets = hub_ids(list(report.calibration_sources.values()))
    if model_id is not None:
        validate_repo_id(model_id, "model_id")
    model_name = model_id or (
        f"{base_model.split('/')[-1]}-{report.method}-{round(100 * report.target_sparsity)}"
        if base_model
        else f"{report.method}-pruned-model"
    )

    results = _model_index(evals, languages, eval_dataset)
    card_data = ModelCardData(
        language=list(dict.fromkeys(lang.code for lang in resolved)),
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        license=license,
        datasets=datasets or None,
        tags=["pruned", "sparse", report.method, "multilingual", "optimum-mwanda"],
        model_name=model_name,
        eval_results=results or None,
    )
    plot_file = None
    if plot_path is not None:
        plot_file = plot_layer_sparsity(report, plot_path).name
    data = build_card_data(
        report,
        languages,
        base_model,
        evals,
        model_name=model_name,
        model_ref=model_id or "path/to/this/model",
        plot_file=plot_file,
        compressed=compressed,
        eval_dataset=eval_dataset,
    )
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **data.to_dict())
