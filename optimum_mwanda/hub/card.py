"""Model cards for pruned models: metadata (languages, base model, licence, tags, per-language perplexity as
``model-index`` results) and a body rendered from ``model_card_template.md``, plus the per-layer sparsity plot.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..calibration.languages import Language, normalize_language_tag, resolve_language, resolve_languages
from ..distributed import main_process_only
from ..evaluation.summary import MEAN_LABEL, geometric_mean
from ..report import PruningReport
from .identity import base_model_id, hub_ids, validate_repo_id
from .verification import group_by_layer

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
CITATIONS_PATH = Path(__file__).with_name("citations.json")
PLOT_FILENAME = "sparsity_per_layer.png"

_METHOD_NAMES = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "mwanda": "M-Wanda"}
_METHOD_NOTES = {
    "wanda": "weight magnitude times input activation norm",
    "sparsegpt": "second-order pruning with weight reconstruction",
    "mwanda": "Wanda with language-aware activation statistics",
}
# Hyperparameters worth showing per method (the rest of the config is in pruning_report.json).
_METHOD_KEYS = {
    "wanda": ("negative_weight",),
    "sparsegpt": (
        "block_size",
        "dampening",
        "hessian_token_stride",
        "diagonal_dampening",
        "nm_selection",
        "refinement_steps",
    ),
    "mwanda": (
        "weight_update",
        "hessian_token_stride",
        "diagonal_dampening",
        "nm_selection",
        "refinement_steps",
        "mean_compensation",
        "compensation_rank",
        "variance_weight",
        "activation_probability_weight",
        "activation_threshold",
    ),
}


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


def _hyperparameter_text(report: PruningReport, key: str) -> Any:
    """A config value for the card; M-Wanda's automatic Hessian stride as the strides it resolved to."""
    config = report.config
    value = getattr(config, key)
    if (
        key != "hessian_token_stride"
        or value is not None
        or getattr(config, "weight_update", None) != "sweep"
    ):
        return value
    from ..parts import hessian_token_stride_for

    tokens = sum(report.token_counts.values())
    widths = sorted({shape[1] for shape in report.module_shapes.values()})
    by_stride: dict[int, list[int]] = {}
    for width in widths:
        stride = hessian_token_stride_for(
            tokens, width, config.max_hessian_token_stride, config.hessian_tokens_per_input
        )
        by_stride.setdefault(stride, []).append(width)
    parts = [
        f"{stride} for {' / '.join(map(str, group))}-feature inputs"
        for stride, group in sorted(by_stride.items(), reverse=True)
    ]
    return "auto: " + "; ".join(parts)


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


def _citations(report: PruningReport, languages: list[Language]) -> list[Citation]:
    keys = {"mwanda": ["mwanda", "wanda"], "wanda": ["wanda"], "sparsegpt": ["sparsegpt"]}.get(
        report.method, []
    )
    keys = list(keys)
    if report.config.layerwise == "owl":
        keys.append("owl")
    # Language-specific calibration (Kurz et al.): anything but an English-only calibration set.
    if [lang.code for lang in languages] not in ([], ["en"], ["eng"]):
        keys.append("kurz")
    sources = " ".join(report.calibration_sources.values()).lower()
    if "translation" in sources or report.negative_calibration_tokens > 0:
        keys.append("kim")
    citations = _load_citations()
    return [citations[key] for key in keys]


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
    method = _METHOD_NAMES.get(report.method, report.method)
    schedule = {"owl": "OWL", "cwl": "CWL", "depth": "depth"}.get(report.config.layerwise, "uniform")
    axes.set_title(f"{method}: sparsity per layer ({schedule} schedule)")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path


# -- card ------------------------------------------------------------------------------------------------
def _card_context(
    report: PruningReport,
    languages: dict[str, Language],
    base_model: str | None,
    evals: dict[str, dict[str, float]],
    model_name: str,
    model_ref: str,
    plot_file: str | None,
    compressed: bool,
    eval_dataset: str | None,
) -> dict[str, Any]:
    config = report.config
    method_name = _METHOD_NAMES.get(report.method, report.method)
    nm = None if config.nm_structure is None else "{}:{}".format(*config.nm_structure)
    layerwise = config.layerwise
    width = config.layerwise_range
    if layerwise == "uniform":
        schedule = "uniform: every decoder layer at the target sparsity"
    elif layerwise == "depth":
        schedule = f"depth ramp (deeper layers sparser), layer sparsities within ±{_pct(width)} of the target"
    elif layerwise == "owl":
        schedule = f"OWL (outlier-weighted), layer sparsities within ±{_pct(width)} of the target"
    else:
        protect = getattr(config, "cwl_protect", "specific")
        schedule = (
            f"CWL (cross-lingual correlation, protecting language-{protect} layers), "
            f"layer sparsities within ±{_pct(width)} of the target"
        )
    # The method's own knobs, then only the calibration knobs that applied (not the config's sampling knobs
    # when the caller gave token ids or a ready calibration set).
    hyperparameters = [
        (key, _hyperparameter_text(report, key))
        for key in _METHOD_KEYS.get(report.method, ())
        if hasattr(config, key)
    ]
    hyperparameters += [
        (f"calibration {key}", _setting_text(value)) for key, value in report.calibration_settings.items()
    ]

    achieved_layers = achieved_layer_sparsity(report)
    n_layers = max(len(report.layer_sparsity), len(achieved_layers))
    layer_rows = [
        {
            "index": i,
            "target": _pct(report.layer_sparsity[i]) if i < len(report.layer_sparsity) else "–",
            "achieved": _pct(achieved_layers.get(i)),
        }
        for i in range(n_layers)
    ]

    calibration_rows = [
        {
            "tag": lang,
            "name": languages[lang].name,
            "tokens": f"{report.token_counts.get(lang, 0):,}",
            "source": report.calibration_sources.get(lang, "–"),
        }
        for lang in report.languages
    ]
    before, after = evals.get("before", {}), evals.get("after", {})
    eval_langs = list(dict.fromkeys([*report.languages, *before, *after]))
    ppl_rows = [
        {
            "tag": lang,
            "name": languages[lang].name,
            "before": _ppl(before.get(lang)),
            "after": _ppl(after.get(lang)),
            "change": _change(before.get(lang), after.get(lang)),
        }
        for lang in eval_langs
        if lang in before or lang in after
    ]
    both = [lang for lang in eval_langs if lang in before and lang in after]
    ppl_mean = None
    if len(both) > 1:
        mean_before = geometric_mean(before[x] for x in both)
        mean_after = geometric_mean(after[x] for x in both)
        ppl_mean = {
            "label": MEAN_LABEL[0].upper() + MEAN_LABEL[1:],
            "before": _ppl(mean_before),
            "after": _ppl(mean_after),
            "change": _change(mean_before, mean_after),
        }

    achieved = report.achieved_sparsity
    n_langs = len(report.languages)
    lang_phrase = (
        f"calibration text in {languages[report.languages[0]].name}"
        if n_langs == 1
        else f"calibration text in {n_langs} languages"
    )
    origin = (
        f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a causal language model"
    )
    summary = (
        f"This is {origin} pruned one-shot to **{_pct(achieved)} sparsity** with **{method_name}**"
        f"{f' ({nm} structured)' if nm else ''}, using {lang_phrase}. "
        "The pruned weights are exact zeros; the architecture and tokenizer are unchanged."
    )
    mask_text = "unstructured (per output row)"
    if nm:
        keep, group = nm.split(":")
        mask_text = f"{nm} (at most {keep} non-zeros in every {group} consecutive input weights)"
    ignore = config.ignore
    left_dense = "embeddings, LM head" + "".join(f", `{p}`" for p in ignore)
    return {
        "title": f"{model_name.split('/')[-1]}: {method_name}, {_pct(achieved)} sparse",
        "summary": summary,
        "compressed": compressed,
        "method_key": report.method,
        "method_name": method_name,
        "method_note": _METHOD_NOTES.get(report.method, ""),
        "mean_compensation": getattr(config, "mean_compensation", "none"),
        "compensation_rank": getattr(config, "compensation_rank", 0),
        "weight_update": getattr(config, "weight_update", None),
        "base_model": base_model,
        "target_sparsity": _pct(report.target_sparsity),
        "achieved_sparsity": _pct(achieved),
        "achieved_sparsity_plain": f"{achieved:.3f}",
        "n_modules": len(report.module_sparsity),
        "n_layers": n_layers,
        "mask_structure": mask_text,
        "nm_structure": nm,
        "layerwise": schedule,
        "left_dense": left_dense,
        "hyperparameters": hyperparameters,
        "package_version": report.optimum_mwanda_version,
        "n_languages": n_langs,
        "total_tokens": f"{sum(report.token_counts.values()):,}",
        "calibration_rows": calibration_rows,
        "ppl_rows": ppl_rows,
        "ppl_mean": ppl_mean,
        "eval_dataset": eval_dataset,
        "layer_rows": layer_rows,
        "plot_file": plot_file,
        "model_ref": model_ref,
        "citations": _citations(report, [languages[x] for x in report.languages]),
    }


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
    model_name = model_id or (
        f"{base_model.split('/')[-1]}-{report.method}-{round(100 * report.target_sparsity)}"
        if base_model
        else f"{report.method}-pruned-model"
    )

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
    # lm-eval scores next to the perplexities, one model-index result per task and metric.
    from ..evaluation.harness import model_index_results

    results += [EvalResult(**entry) for entry in model_index_results(evals.get("downstream", {}))]
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
    context = _card_context(
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
    context["downstream_rows"] = [
        {"task": task, "metrics": ", ".join(f"{m} {v:.4g}" for m, v in metrics.items() if "stderr" not in m)}
        for task, metrics in evals.get("downstream", {}).items()
    ]
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **context)
