"""Model cards for pruned models: metadata (languages, base model, licence, tags, per-language perplexity as
``model-index`` results) and a body rendered from ``model_card_template.md``, plus the per-layer sparsity plot.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..distributed import main_process_only
from ..report import PruningReport
from ..version import __version__
from .languages import Language, resolve_languages
from .verification import group_by_layer

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
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
    "sparsegpt": ("block_size", "dampening"),
    "mwanda": (
        "mean_compensation",
        "variance_weight",
        "activation_probability_weight",
        "activation_threshold",
    ),
}
_SCHEDULE_KEYS = ("calibration_seq_len", "samples_per_language", "seed")


@dataclass(frozen=True)
class Citation:
    key: str
    text: str
    bibtex: str


_CITATIONS = {
    "mwanda": Citation(
        "choenni2025mwanda",
        "Rochelle Choenni and Ivan Titov. *M-Wanda: Improving One-Shot Pruning for Multilingual LLMs.* EMNLP 2025.",
        "@inproceedings{choenni2025mwanda,\n"
        "  title     = {M-Wanda: Improving One-Shot Pruning for Multilingual {LLM}s},\n"
        "  author    = {Choenni, Rochelle and Titov, Ivan},\n"
        "  booktitle = {Proceedings of the 2025 Conference on Empirical Methods in Natural Language Processing},\n"
        "  year      = {2025}\n}",
    ),
    "wanda": Citation(
        "sun2024wanda",
        "Mingjie Sun, Zhuang Liu, Anna Bair and J. Zico Kolter. *A Simple and Effective Pruning Approach for "
        "Large Language Models.* ICLR 2024.",
        "@inproceedings{sun2024wanda,\n"
        "  title     = {A Simple and Effective Pruning Approach for Large Language Models},\n"
        "  author    = {Sun, Mingjie and Liu, Zhuang and Bair, Anna and Kolter, J. Zico},\n"
        "  booktitle = {International Conference on Learning Representations},\n"
        "  year      = {2024}\n}",
    ),
    "sparsegpt": Citation(
        "frantar2023sparsegpt",
        "Elias Frantar and Dan Alistarh. *SparseGPT: Massive Language Models Can Be Accurately Pruned in "
        "One-Shot.* ICML 2023.",
        "@inproceedings{frantar2023sparsegpt,\n"
        "  title     = {{SparseGPT}: Massive Language Models Can Be Accurately Pruned in One-Shot},\n"
        "  author    = {Frantar, Elias and Alistarh, Dan},\n"
        "  booktitle = {International Conference on Machine Learning},\n"
        "  year      = {2023}\n}",
    ),
    "owl": Citation(
        "yin2024owl",
        "Lu Yin et al. *Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs to "
        "High Sparsity.* ICML 2024.",
        "@inproceedings{yin2024owl,\n"
        "  title     = {Outlier Weighed Layerwise Sparsity ({OWL}): A Missing Secret Sauce for Pruning {LLM}s to "
        "High Sparsity},\n"
        "  author    = {Yin, Lu and others},\n"
        "  booktitle = {International Conference on Machine Learning},\n"
        "  year      = {2024}\n}",
    ),
    "kurz": Citation(
        "kurz2024calibration",
        "Simon Kurz, Jian-Jia Chen, Lucie Flek and Zhixue Zhao. *Investigating Language-Specific Calibration "
        "For Pruning Multilingual Large Language Models.* 2024.",
        "@misc{kurz2024calibration,\n"
        "  title  = {Investigating Language-Specific Calibration For Pruning Multilingual Large Language Models},\n"
        "  author = {Kurz, Simon and Chen, Jian-Jia and Flek, Lucie and Zhao, Zhixue},\n"
        "  year   = {2024}\n}",
    ),
    "kim": Citation(
        "kim2024pruning",
        "Hwichan Kim, Jun Suzuki, Tosho Hirasawa and Mamoru Komachi. *Pruning Multilingual Large Language "
        "Models for Multilingual Inference.* Findings of EMNLP 2024.",
        "@inproceedings{kim2024pruning,\n"
        "  title     = {Pruning Multilingual Large Language Models for Multilingual Inference},\n"
        "  author    = {Kim, Hwichan and Suzuki, Jun and Hirasawa, Tosho and Komachi, Mamoru},\n"
        "  booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2024},\n"
        "  year      = {2024}\n}",
    ),
}


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


def _check_eval_results(eval_results: dict[str, dict[str, float]] | None) -> dict[str, dict[str, float]]:
    if eval_results is None:
        return {}
    if not isinstance(eval_results, dict):
        raise TypeError("eval_results must be {'before': {lang: ppl}, 'after': {lang: ppl}}")
    unknown = sorted(set(eval_results) - {"before", "after"})
    if unknown:
        raise ValueError(f"eval_results keys must be 'before' and/or 'after', got {unknown}")
    checked: dict[str, dict[str, float]] = {}
    for stage, values in eval_results.items():
        if not isinstance(values, dict):
            raise TypeError(f"eval_results[{stage!r}] must map language codes to perplexities")
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
        checked[stage] = {str(k): float(v) for k, v in values.items()}
    return checked


def achieved_layer_sparsity(report: PruningReport) -> dict[int, float]:
    """Achieved sparsity per decoder layer, from the report's per-module sparsity and shapes."""
    numel = {name: int(math.prod(report.module_shapes.get(name, [1, 1]))) for name in report.module_sparsity}
    return group_by_layer(report.module_sparsity, numel)


def _hub_ids(sources: list[str]) -> list[str]:
    """The entries that are valid Hub repo ids (``namespace/name`` or ``name``), deduplicated in order."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    ids = []
    for source in sources:
        try:
            validate_repo_id(source)
        except HFValidationError:
            continue
        if source not in ids:
            ids.append(source)
    return ids


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
    layerwise = report.config.get("layerwise", "uniform")
    if layerwise == "owl":
        keys.append("owl")
    # Language-specific calibration (Kurz et al.): anything but an English-only calibration set.
    if [lang.code for lang in languages] not in ([], ["en"], ["eng"]):
        keys.append("kurz")
    sources = " ".join(report.calibration_sources.values()).lower()
    if "translation" in sources or report.negative_calibration_tokens > 0:
        keys.append("kim")
    return [_CITATIONS[key] for key in keys]


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
    schedule = {"owl": "OWL", "cwl": "CWL", "depth": "depth"}.get(
        report.config.get("layerwise", "uniform"), "uniform"
    )
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
    mask = config.get("mask_structure", "unstructured")
    nm = None if str(mask).strip().lower() == "unstructured" else str(mask).replace(" ", "")
    layerwise = config.get("layerwise", "uniform")
    width = config.get("layerwise_range")
    if layerwise == "uniform":
        schedule = "uniform: every decoder layer at the target sparsity"
    elif layerwise == "depth":
        schedule = f"depth ramp (deeper layers sparser), layer sparsities within ±{_pct(width)} of the target"
    elif layerwise == "owl":
        schedule = f"OWL (outlier-weighted), layer sparsities within ±{_pct(width)} of the target"
    else:
        protect = config.get("cwl_protect", "specific")
        schedule = (
            f"CWL (cross-lingual correlation, protecting language-{protect} layers), "
            f"layer sparsities within ±{_pct(width)} of the target"
        )
    keys = _METHOD_KEYS.get(report.method, ()) + _SCHEDULE_KEYS
    hyperparameters = [(key, config[key]) for key in keys if key in config]

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
        mean_before = sum(before[x] for x in both) / len(both)
        mean_after = sum(after[x] for x in both) / len(both)
        ppl_mean = {
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
    ignore = config.get("ignore") or []
    left_dense = "embeddings, LM head" + "".join(f", `{p}`" for p in ignore)
    return {
        "title": f"{model_name.split('/')[-1]}: {method_name}, {_pct(achieved)} sparse",
        "summary": summary,
        "compressed": compressed,
        "method_key": report.method,
        "method_name": method_name,
        "method_note": _METHOD_NOTES.get(report.method, ""),
        "mean_compensation": config.get("mean_compensation", "none") if report.method == "mwanda" else "none",
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
        "package_version": config.get("optimum_mwanda_version", __version__),
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
    resolved = resolve_languages(tags)
    languages = {lang.tag: lang for lang in resolved}
    recorded = getattr(report, "base_model", "") or ""
    if base_model is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(base_model)
        except HFValidationError as err:
            raise ValueError(
                f"base_model must be a Hub model id such as 'google/gemma-3-270m': {err}"
            ) from None
    elif recorded and not os.path.exists(recorded):
        base_model = next(iter(_hub_ids([recorded])), None)
    if license is None:
        # The recorded name_or_path may be a local copy of the base model whose card states the licence.
        license = _license_from_local_card(base_model) or _license_from_local_card(recorded)
    if datasets is None:
        datasets = _hub_ids(list(report.calibration_sources.values()))
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
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), **context)
