"""Calibration-language matrix (Kurz et al., 2024): which calibration language suits which target language?

Each row of the result is one pruning run calibrated on one language (or a named mix of languages); each
column is the perplexity on one evaluation language. A dense (unpruned) baseline row makes the numbers
comparable: the interesting quantity is usually the ratio to dense.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..calibration import build_calibration
from ..calibration.languages import normalize_language_tag
from ..configuration import PruningConfig
from .inputs import normalize_texts_by_language
from .perplexity import evaluate_perplexity, prepare_evaluation

DENSE_ROW = "dense"


@dataclass
class LanguageMatrixResult:
    """Perplexity matrix of calibration languages (rows) by evaluation languages (columns).

    Attributes:
        eval_languages: column order.
        rows: ``{row name: {eval language: perplexity}}``; a row is a calibration language or a mix name.
        row_languages: ``{row name: [calibration languages]}``.
        dense: ``{eval language: perplexity}`` of the unpruned model (empty when not measured).
        method: the pruning method name.
        config: the pruning config as a dict.
        reports: ``{row name: PruningReport.to_dict()}`` when the pruner returned a report.
        eval_seq_len: window length used for evaluation.
    """

    eval_languages: list[str]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    row_languages: dict[str, list[str]] = field(default_factory=dict)
    dense: dict[str, float] = field(default_factory=dict)
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval_seq_len: int = 0

    def __post_init__(self) -> None:
        for name, row in self.rows.items():
            missing = [lang for lang in self.eval_languages if lang not in row]
            if missing:
                raise ValueError(f"matrix row {name!r} lacks evaluation languages {missing}")
        if self.dense and any(lang not in self.dense for lang in self.eval_languages):
            raise ValueError("the dense row must cover every evaluation language")

    @property
    def row_names(self) -> list[str]:
        return list(self.rows)

    def matrix(self) -> list[list[float]]:
        """Perplexities, rows in :attr:`row_names` order, columns in :attr:`eval_languages` order."""
        return [[self.rows[name][lang] for lang in self.eval_languages] for name in self.row_names]

    def relative_matrix(self) -> list[list[float]]:
        """Each perplexity divided by the dense one of its column (needs the dense row)."""
        if not self.dense:
            raise ValueError("this matrix has no dense baseline; run it with include_dense=True")
        return [
            [value / self.dense[lang] for value, lang in zip(row, self.eval_languages)]
            for row in self.matrix()
        ]

    def _dense_values(self, relative: bool) -> list[float]:
        if relative:
            return [1.0] * len(self.eval_languages)
        return [self.dense[lang] for lang in self.eval_languages]

    def best_calibration(self) -> dict[str, str]:
        """``{eval language: row name}`` of the lowest perplexity in each column."""
        return {
            lang: min(self.row_names, key=lambda name: self.rows[name][lang]) for lang in self.eval_languages
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "eval_languages": list(self.eval_languages),
            "rows": {name: dict(row) for name, row in self.rows.items()},
            "row_languages": {name: list(langs) for name, langs in self.row_languages.items()},
            "dense": dict(self.dense),
            "method": self.method,
            "config": dict(self.config),
            "reports": dict(self.reports),
            "eval_seq_len": self.eval_seq_len,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LanguageMatrixResult:
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self, relative: bool = False, digits: int = 2) -> str:
        """A Markdown table: one row per calibration language/mix (plus dense), one column per eval language.

        With ``relative=True`` the cells are ratios to the dense perplexity of the column.
        """
        values = self.relative_matrix() if relative else self.matrix()
        header = ["calibration \\ eval", *self.eval_languages]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * len(self.eval_languages)) + "|",
        ]
        if self.dense:
            dense = self._dense_values(relative)
            lines.append(f"| {DENSE_ROW} | " + " | ".join(_fmt(v, digits, relative) for v in dense) + " |")
        for name, row in zip(self.row_names, values):
            langs = self.row_languages.get(name, [name])
            joined = "+".join(langs)
            label = name if name == joined else f"{name} ({joined})"
            lines.append(f"| {label} | " + " | ".join(_fmt(v, digits, relative) for v in row) + " |")
        return "\n".join(lines) + "\n"

    def plot_heatmap(self, path, relative: bool | None = None, title: str | None = None) -> None:
        """Write the matrix as an annotated PNG heatmap.

        Args:
            path: output file (PNG).
            relative: colour and annotate by ratio to dense (default when a dense row exists); otherwise by
                perplexity on a logarithmic colour scale, since perplexities span orders of magnitude.
            title: figure title (default: method and sparsity).
        """
        # The object-oriented API with an Agg canvas: no pyplot, so no global backend or figure state.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter, NullFormatter

        if relative is None:
            relative = bool(self.dense)
        names = self.row_names
        values = self.relative_matrix() if relative else self.matrix()
        if self.dense:
            names = [DENSE_ROW, *names]
            dense = self._dense_values(relative)
            values = [dense, *values]
        finite = [v for row in values for v in row if math.isfinite(v) and v > 0]
        if not finite:
            raise ValueError("the matrix has no finite positive value to plot")
        low, high = min(finite), max(finite)
        norm = LogNorm(vmin=low, vmax=high if high > low else low * 1.0001)
        grid = [[v if math.isfinite(v) and v > 0 else float("nan") for v in row] for row in values]

        width = 1.6 + 0.9 * len(self.eval_languages)
        height = 1.4 + 0.55 * len(names)
        fig = Figure(figsize=(max(width, 4.0), max(height, 2.5)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(grid, cmap="magma_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(self.eval_languages)), labels=self.eval_languages)
        ax.set_yticks(range(len(names)), labels=names)
        ax.set_xlabel("evaluation language")
        ax.set_ylabel("calibration language")
        midpoint = math.sqrt(low * high)
        for i, row in enumerate(values):
            for j, value in enumerate(row):
                text = _fmt(value, 2, relative)
                colour = "white" if math.isfinite(value) and value > midpoint else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
        if self.dense:
            ax.axhline(0.5, color="white", linewidth=2)
        colorbar = fig.colorbar(
            image, ax=ax, label="perplexity / dense" if relative else "perplexity (log scale)"
        )
        # Plain numbers ("6", "200") rather than the log axis' default "6 x 10^0"; minor ticks are labelled
        # only within one decade, where they are the only labels and do not crowd each other.
        colorbar.ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        colorbar.ax.yaxis.set_minor_formatter(
            FormatStrFormatter("%g") if high / low < 10 else NullFormatter()
        )
        sparsity = self.config.get("sparsity")
        default_title = f"{self.method or 'pruned'}" + (
            f" @ {sparsity:.0%} sparsity" if sparsity is not None else ""
        )
        ax.set_title(title or default_title)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)


def calibration_language_matrix(
    model_factory: Callable[[], torch.nn.Module],
    tokenizer,
    config: PruningConfig,
    calibration_texts: Mapping[str, Sequence[str] | str],
    eval_texts: Mapping[str, Sequence[str] | str],
    calibration_languages: Sequence[str] | None = None,
    mixes: Mapping[str, Sequence[str]] | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    include_dense: bool = True,
    fixed_budget: bool = True,
    show_progress: bool = True,
    add_bos: bool | None = None,
) -> LanguageMatrixResult:
    """Prune a fresh copy of a model once per calibration language (and mix) and evaluate every language.

    Args:
        model_factory: returns a fresh dense model on each call (pruning is in place).
        tokenizer: the model's tokenizer.
        config: the pruning config; its ``samples_per_language``, ``calibration_seq_len`` and ``seed`` set
            the calibration data.
        calibration_texts: ``{language: texts}`` to calibrate on.
        eval_texts: ``{language: held-out texts}`` to evaluate on.
        calibration_languages: single-language rows; default every language of ``calibration_texts``;
            ``[]`` for mixes only.
        mixes: ``{row name: [languages]}``, each calibrated with equal shares of its languages.
        seq_len, stride, batch_size, max_windows: evaluation settings (see :func:`evaluate_perplexity`).
        include_dense: also evaluate an unpruned model (the ``dense`` row).
        fixed_budget: give every row the same number of calibration sequences
            (``config.samples_per_language``), split equally among a mix's languages (at least one each);
            with ``False`` a mix gets ``samples_per_language`` sequences per language.
        show_progress: progress bars for evaluation.
        add_bos: prepend BOS to evaluation windows (``None``: when the tokenizer has one).

    Returns:
        A :class:`LanguageMatrixResult`.
    """
    from ..pruner import Pruner

    if not callable(model_factory):
        raise TypeError("model_factory must be a callable returning a fresh dense model")
    if not isinstance(config, PruningConfig):
        raise TypeError(f"config must be a PruningConfig (WandaConfig, ...), got {type(config).__name__}")
    calibration = normalize_texts_by_language(calibration_texts, what="calibration")
    evaluation = normalize_texts_by_language(eval_texts, what="evaluation")
    plan = _plan_rows(calibration, calibration_languages, mixes)

    result = LanguageMatrixResult(
        eval_languages=list(evaluation), method=config.method, config=config.to_dict(), eval_seq_len=seq_len
    )
    settings = {
        "seq_len": seq_len,
        "stride": stride,
        "batch_size": batch_size,
        "max_windows": max_windows,
        "show_progress": show_progress,
        "add_bos": add_bos,
    }
    # Check the evaluation settings and build every calibration set before any model work, so a bad setting
    # or a language with too little text fails at once rather than after the first pruning run.
    prepare_evaluation(tokenizer, evaluation, seq_len, stride, batch_size, max_windows, add_bos=add_bos)
    calibration_sets = {
        name: _calibration_for(langs, calibration, tokenizer, config, fixed_budget)
        for name, langs in plan.items()
    }
    if include_dense:
        model = model_factory()
        result.dense = evaluate_perplexity(model, tokenizer, evaluation, **settings)
        # Free each model before the factory builds the next, so at most one copy is alive.
        del model
        _collect_garbage()
    for name, langs in plan.items():
        model = model_factory()
        report = Pruner(config).prune_model(
            model, calibration_sets[name], tokenizer=tokenizer, show_progress=show_progress
        )
        result.rows[name] = evaluate_perplexity(model, tokenizer, evaluation, **settings)
        result.row_languages[name] = list(langs)
        result.reports[name] = report.to_dict()
        del model, report
        _collect_garbage()
    return result


def _plan_rows(
    calibration: Mapping[str, list[str]],
    calibration_languages: Sequence[str] | None,
    mixes: Mapping[str, Sequence[str]] | None,
) -> dict[str, list[str]]:
    """``{row name: languages}``: single languages first, then mixes; validated against the texts."""
    if isinstance(calibration_languages, str):
        calibration_languages = [calibration_languages]
    singles = list(calibration) if calibration_languages is None else list(calibration_languages)
    plan: dict[str, list[str]] = {}
    for lang in singles:
        normalize_language_tag(lang)
        if lang not in calibration:
            raise ValueError(
                f"calibration language {lang!r} has no calibration text (have {list(calibration)})"
            )
        plan[lang] = [lang]
    for name, langs in (mixes or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"mix names must be non-empty strings, got {name!r}")
        if name in plan or name == DENSE_ROW:
            raise ValueError(f"mix name {name!r} collides with a calibration language or the dense row")
        if isinstance(langs, str):
            raise TypeError(f"mix {name!r} must list languages, e.g. ['en', 'de'], not the string {langs!r}")
        langs = list(dict.fromkeys(langs))
        if not langs:
            raise ValueError(f"mix {name!r} has no languages")
        missing = [lang for lang in langs if lang not in calibration]
        if missing:
            raise ValueError(f"mix {name!r} uses languages without calibration text: {missing}")
        plan[name] = langs
    if not plan:
        raise ValueError("the matrix has no rows: give calibration_languages and/or mixes")
    return plan


def mix_shares(num_languages: int, samples: int, fixed_budget: bool) -> int:
    """Calibration sequences per language of a row with ``num_languages`` languages."""
    if not fixed_budget:
        return samples
    return max(1, round(samples / num_languages))


def _calibration_for(langs, calibration, tokenizer, config: PruningConfig, fixed_budget: bool):
    per_language = mix_shares(len(langs), config.samples_per_language, fixed_budget)
    return build_calibration(
        {lang: calibration[lang] for lang in langs},
        tokenizer,
        samples_per_language=per_language,
        seq_len=config.calibration_seq_len,
        seed=config.seed,
    )


def _collect_garbage() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(value: float, digits: int, relative: bool) -> str:
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    if relative:
        return f"×{value:.{digits}f}"
    return f"{value:.{digits}f}" if value < 1e4 else f"{value:.3g}"


# Deprecated names: "sweep" now means only SparseGPT's column sweep.
SweepResult = LanguageMatrixResult
calibration_language_sweep = calibration_language_matrix
