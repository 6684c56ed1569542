"""Downstream evaluation through EleutherAI's lm-evaluation-harness, per language, offline.

:func:`run_downstream` runs lm-eval's own ``simple_evaluate`` with its ``HFLM`` wrapper on a model already
in memory (pruned or dense): the prompts, log-likelihoods, generation and metrics (``acc``, ``acc_norm``,
sacrebleu's chrF) are lm-eval's. The bundled tasks (``optimum_mwanda.evaluation.tasks``, built from the
held-out corpus and aligned handbook editions) need no network; any other lm-eval task name (``xnli_de``,
``belebele_swh_Latn``, ...) is passed through and downloads its data from the Hub as lm-eval does.

Needs the ``eval`` extra: ``pip install 'optimum-mwanda[eval]'`` (``lm-eval`` and ``sacrebleu``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .local_data import TaskDataPlan, local_task_manager, plan_task_data
from .tasks import CONTINUATION, GROUPS, TASKS_DIR, TRANSLATION, subtask_names, task_languages

LM_EVAL_MISSING = (
    "lm-evaluation-harness is not installed: pip install 'optimum-mwanda[eval]' "
    "(installs lm-eval and sacrebleu)"
)

# Columns of the per-language table: (column, task-name pattern, metric).
_CONTINUATION_RE = re.compile(r"^mwanda_continuation_(?P<lang>[a-z]{2,3})$")
_TRANSLATION_RE = re.compile(r"^mwanda_translation_(?P<src>[a-z]{2,3})-(?P<tgt>[a-z]{2,3})$")
COLUMNS = ("continuation_acc", "continuation_acc_norm", "chrf_en_xx", "chrf_xx_en")


def lm_eval_available() -> bool:
    """Whether the optional ``lm_eval`` package (and sacrebleu, for chrF) can be imported."""
    import importlib.util

    return (
        importlib.util.find_spec("lm_eval") is not None and importlib.util.find_spec("sacrebleu") is not None
    )


def expand_tasks(tasks: str | Sequence[str], languages: Sequence[str] | None = None) -> list[str]:
    """Task names for lm-eval: the bundled families become one subtask per language.

    ``tasks`` is a list or a comma-separated string. ``mwanda_continuation``, ``mwanda_translation`` (both
    directions), ``mwanda_translation_en_xx`` and ``mwanda_translation_xx_en`` expand to their subtasks
    for ``languages`` (all that have one when ``None``); other names are kept as they are.

    Raises:
        ValueError: no task, or ``languages`` given and no bundled subtask exists for any of them.
    """
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise ValueError("give at least one task")
    expanded: list[str] = []
    for name in names:
        if name in (*GROUPS, TRANSLATION):
            subtasks = subtask_names(name, list(languages) if languages is not None else None)
            if not subtasks:
                raise ValueError(
                    f"{name} has no subtask for {list(languages or [])}; it has "
                    f"{', '.join(task_languages(name))}"
                )
            expanded += subtasks
        else:
            expanded.append(name)
    return list(dict.fromkeys(expanded))


# Numeric entries of lm-eval's results that are not scores (``sample_len``: the documents of a group).
_NOT_METRICS = frozenset({"sample_len", "sample_count"})


def _flatten(metrics: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval's ``{"acc,none": v, "alias": ...}`` -> ``{"acc": v}`` (non-default filters kept in the name)."""
    row: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # aliases, "N/A" stderrs
        metric, _, filter_name = key.partition(",")
        if metric in _NOT_METRICS:
            continue
        row[metric if filter_name in ("", "none") else f"{metric} ({filter_name})"] = float(value)
    return row


@dataclasses.dataclass
class DownstreamResult:
    """Scores of one model on lm-eval tasks.

    Attributes:
        tasks: ``{task: {metric: value}}`` as lm-eval reports them (``acc``, ``acc_stderr``, ``chrf``, ...).
            ``acc`` is a fraction in [0, 1]; ``chrf`` is sacrebleu's chrF in [0, 100].
        samples: ``{task: number of documents scored}`` (``--limit`` caps it).
        settings: how it was run (tasks, limit, few-shot, batch size, lm-eval version, seconds).
    """

    tasks: dict[str, dict[str, float]]
    samples: dict[str, int]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    documents: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)

    @property
    def by_language(self) -> dict[str, dict[str, float]]:
        """``{lang: {column: value}}`` for the bundled tasks; columns in :data:`COLUMNS`, each followed by
        ``<column>_stderr`` where lm-eval reports a standard error.

        ``continuation_acc``/``_acc_norm``: the language's multiple-choice task (chance 0.25);
        ``chrf_en_xx``: English -> the language; ``chrf_xx_en``: the language -> English.
        """
        table: dict[str, dict[str, float]] = {}
        for task, metrics in self.tasks.items():
            match = _CONTINUATION_RE.match(task)
            if match:
                row = table.setdefault(match["lang"], {})
                for metric in ("acc", "acc_norm"):
                    _put(row, f"continuation_{metric}", metrics, metric)
                continue
            match = _TRANSLATION_RE.match(task)
            if match and "chrf" in metrics:
                if match["src"] == "en":
                    _put(table.setdefault(match["tgt"], {}), "chrf_en_xx", metrics, "chrf")
                else:
                    _put(table.setdefault(match["src"], {}), "chrf_xx_en", metrics, "chrf")
        return dict(sorted(table.items()))

    def means(self) -> dict[str, float]:
        """Unweighted mean of each column over the languages that have it (each language counts once)."""
        columns: dict[str, list[float]] = {}
        for row in self.by_language.values():
            for column, value in row.items():
                columns.setdefault(column, []).append(value)
        return {c: sum(v) / len(v) for c, v in columns.items() if c in COLUMNS}

    def mean_stderrs(self) -> dict[str, float]:
        """Standard error of each of :meth:`means`: ``sqrt(sum of se_i^2) / k`` over the k languages (the
        languages' documents are independent samples); only columns whose every language has a stderr."""
        out = {}
        for column in COLUMNS:
            rows = [row for row in self.by_language.values() if column in row]
            errors = [row.get(f"{column}_stderr") for row in rows]
            if rows and all(e is not None and math.isfinite(e) for e in errors):
                out[column] = math.sqrt(sum(e * e for e in errors)) / len(rows)
        return out

    @property
    def other_tasks(self) -> dict[str, dict[str, float]]:
        """Results of tasks and groups that are not bundled (lm-eval's own), as lm-eval reports them."""
        return {
            t: m for t, m in self.tasks.items() if not (_CONTINUATION_RE.match(t) or _TRANSLATION_RE.match(t))
        }

    def format_table(self) -> str:
        """A plain-text table: a row per language, a column per bundled metric (``value ± stderr``), the
        mean, then a row per other task (each metric with its standard error) and its documents."""
        table = self.by_language
        columns = [c for c in COLUMNS if any(c in row for row in table.values())]
        lines = []
        if columns:
            header = "language".ljust(10) + "".join(c.rjust(24) for c in columns) + "n".rjust(8)
            lines += [header, "-" * len(header)]
            for lang, row in table.items():
                n = self.samples.get(f"mwanda_continuation_{lang}") or self.samples.get(
                    f"mwanda_translation_en-{lang}", 0
                )
                cells = "".join(_cell(row.get(c), c, row.get(f"{c}_stderr")).rjust(24) for c in columns)
                lines.append(lang.ljust(10) + cells + str(n).rjust(8))
            means, errors = self.means(), self.mean_stderrs()
            cells = "".join(_cell(means.get(c), c, errors.get(c)).rjust(24) for c in columns)
            lines.append("mean".ljust(10) + cells)
        others = self.other_tasks
        if others:
            if lines:
                lines.append("")
            width = max(len("task"), *(len(t) for t in others)) + 2
            lines.append(
                "task".ljust(width)
                + "metric".ljust(12)
                + "value".rjust(10)
                + "stderr".rjust(10)
                + "n".rjust(8)
            )
            lines.append("-" * (width + 40))
            for task, metrics in others.items():
                n = self.samples.get(task)
                if n is None:  # a group: the documents of its tasks
                    n = sum(
                        self.samples.get(t, 0) for t in self.settings.get("group_tasks", {}).get(task, [])
                    )
                for metric, value in metrics.items():
                    if metric.partition(" (")[0].endswith("_stderr"):
                        continue
                    error = metrics.get(_stderr_key(metric))
                    lines.append(
                        task.ljust(width)
                        + metric.ljust(12)
                        + f"{value:.4f}".rjust(10)
                        + (f"{error:.4f}" if error is not None and math.isfinite(error) else "-").rjust(10)
                        + (str(n) if n else "").rjust(8)
                    )
                    task = ""  # the name once per task
        return "\n".join(lines)

    def eval_results(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` with each metric's standard error next to it as ``<metric>_stderr``
        (where lm-eval gives one): the ``downstream`` entry of ``save_pretrained(..., eval_results={"after":
        ppl, "downstream": ...})``. Non-finite values are left out."""
        return {
            task: {m: v for m, v in metrics.items() if math.isfinite(v)}
            for task, metrics in self.tasks.items()
        }

    def to_dict(self) -> dict[str, Any]:
        data = {
            "tasks": self.tasks,
            "samples": self.samples,
            "by_language": self.by_language,
            "means": self.means(),
            "mean_stderrs": self.mean_stderrs(),
            "settings": self.settings,
        }
        if self.documents:
            data["documents"] = self.documents
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DownstreamResult:
        return cls(
            dict(data["tasks"]),
            dict(data.get("samples", {})),
            dict(data.get("settings", {})),
            dict(data.get("documents", {})),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


def _stderr_key(metric: str) -> str:
    """``acc`` -> ``acc_stderr``; ``acc (strict-match)`` -> ``acc_stderr (strict-match)`` (lm-eval's names)."""
    name, sep, rest = metric.partition(" (")
    return f"{name}_stderr{sep}{rest}"


def _put(row: dict[str, float], column: str, metrics: Mapping[str, float], metric: str) -> None:
    if metric in metrics:
        row[column] = metrics[metric]
        error = metrics.get(_stderr_key(metric))
        if error is not None and math.isfinite(error):
            row[f"{column}_stderr"] = error


def _cell(value: float | None, column: str, stderr: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    digits = 1 if column.startswith("chrf") else 3
    text = f"{value:.{digits}f}"
    if stderr is not None and math.isfinite(stderr):
        text += f" ± {stderr:.{digits}f}"
    return text


def run_downstream(
    model,
    tokenizer,
    tasks: str | Sequence[str] = (CONTINUATION,),
    *,
    languages: Sequence[str] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    include_path: str | Sequence[str] | None = None,
    task_data: str | Path | Sequence[str | Path] | TaskDataPlan | None = None,
    keep_documents: bool = False,
    show_progress: bool = True,
    seed: int = 0,
) -> DownstreamResult:
    """Evaluate an in-memory causal LM on lm-eval tasks; per-language results for the bundled tasks.

    Args:
        model: a ``PreTrainedModel`` (dense, pruned, or offloaded with a device map); evaluated as it is.
        tokenizer: its tokenizer.
        tasks: task names or a comma-separated string. Bundled families: ``mwanda_continuation``,
            ``mwanda_translation`` (both directions), ``mwanda_translation_en_xx``, ``mwanda_translation_xx_en``,
            or their subtasks (``mwanda_continuation_de``, ``mwanda_translation_en-sw``...); any other lm-eval
            task name is passed through (it downloads from the Hub).
        languages: restrict the bundled families to these languages (``None``: all).
        limit: documents per subtask (an int), or a fraction of each; lm-eval takes the first ones.
        num_fewshot: overrides the tasks' own few-shot setting (translation: 3, continuation: 0).
        batch_size: lm-eval's batch size (requests per forward pass).
        max_length: the context length lm-eval truncates to (default: the model's).
        include_path: more folders of task YAMLs, searched with the bundled one.
        show_progress: lm-eval's progress bars over requests.
        seed: lm-eval's random, numpy and torch seeds (few-shot sampling of Hub tasks).

    Returns:
        A :class:`DownstreamResult`.

    Raises:
        ImportError: the ``eval`` extra is not installed.
        ValueError: no task, a bundled family with no subtask for ``languages``, or a task lm-eval cannot find.
    """
    if not lm_eval_available():
        raise ImportError(LM_EVAL_MISSING)
    names = expand_tasks(tasks, languages)
    import lm_eval

    paths = _include_paths(include_path)
    plan: TaskDataPlan | None = None
    if isinstance(task_data, TaskDataPlan):
        plan = task_data
    elif task_data is not None:
        plan = prepare_task_data(names, task_data, include_path=include_path, num_fewshot=num_fewshot)
    with tempfile.TemporaryDirectory(prefix="optimum-mwanda-tasks-") as overrides:
        if plan is not None:
            manager = local_task_manager(plan, Path(overrides), paths)
        else:
            manager = _task_manager(names, paths, include_path is not None)
        unknown = [n for n in names if n not in manager.all_tasks]
        if unknown:
            raise ValueError(f"lm-eval knows no task {unknown} (searched its own tasks and {paths})")
        start = time.perf_counter()
        output = _evaluate(
            model,
            tokenizer,
            names,
            manager,
            limit,
            num_fewshot,
            batch_size,
            max_length,
            show_progress,
            seed,
            keep_documents,
        )
    results = {task: _flatten(m) for task, m in output.get("results", {}).items()}
    samples = {
        task: int(counts.get("effective", counts.get("original", 0)))
        for task, counts in (output.get("n-samples") or {}).items()
    }
    settings = {
        "tasks": names,
        "languages": list(languages) if languages is not None else None,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "seconds": time.perf_counter() - start,
    }
    groups = {g: list(m) for g, m in (output.get("group_subtasks") or {}).items() if m}
    if groups:
        settings["group_tasks"] = groups
    if plan is not None:
        settings["task_data"] = plan.to_dict()
    documents = _documents(output.get("samples") or {}) if keep_documents else {}
    return DownstreamResult(results, samples, settings, documents)


def _documents(logged: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, list[dict[str, float]]]:
    """lm-eval's logged samples -> ``{task: [{"doc_id": i, metric: value, ...}]}`` (per-document scores,
    e.g. ``acc`` 0/1, for paired comparisons of two models on the same documents)."""
    documents = {}
    for task, rows in logged.items():
        kept = []
        for row in rows:
            entry = {"doc_id": int(row["doc_id"])}
            for key, value in row.items():
                if (
                    key not in ("doc_id", "target")
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    entry[key] = float(value)
            kept.append(entry)
        documents[task] = sorted(kept, key=lambda e: e["doc_id"])
    return documents


def _include_paths(include_path: str | Sequence[str] | None) -> list[str]:
    paths = [str(TASKS_DIR)]
    if include_path is not None:
        paths += [include_path] if isinstance(include_path, str) else list(include_path)
    return paths


def _task_manager(names: Sequence[str], paths: Sequence[str], extra_paths: bool):
    from lm_eval.tasks import TaskManager

    bundled = all(_CONTINUATION_RE.match(n) or _TRANSLATION_RE.match(n) for n in names)
    # Indexing lm-eval's own few thousand task YAMLs takes seconds; skip it when only bundled tasks run.
    return TaskManager(include_path=list(paths), include_defaults=not bundled or extra_paths)


@functools.lru_cache(maxsize=2)
def _full_task_manager(paths: tuple[str, ...]):
    """lm-eval's index of its own tasks and ``paths`` (seconds to build: kept for the next plan)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=True)


def prepare_task_data(
    tasks: str | Sequence[str],
    task_data: str | Path | Sequence[str | Path],
    *,
    languages: Sequence[str] | None = None,
    include_path: str | Sequence[str] | None = None,
    num_fewshot: int | None = None,
) -> TaskDataPlan:
    """Resolve lm-eval tasks to local data without running them (fails fast, before a model is loaded).

    The bundled ``mwanda_*`` tasks read their own files and are left out of the plan; every other task,
    group or tag is looked up in lm-eval's index (and ``include_path``) and each of its leaf tasks is given
    local files for the splits it reads (:func:`~optimum_mwanda.evaluation.local_data.plan_task_data`).

    Raises:
        ImportError: the ``eval`` extra is not installed.
        MissingTaskData: a task's data is missing (the message names the files expected).
        ValueError: an unknown task, a missing folder, an ambiguous or unsupported layout.
    """
    if not lm_eval_available():
        raise ImportError(LM_EVAL_MISSING)
    names = expand_tasks(tasks, languages)
    manager = _full_task_manager(tuple(_include_paths(include_path)))
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {unknown}")
    bundled = [n for n in names if _CONTINUATION_RE.match(n) or _TRANSLATION_RE.match(n)]
    return plan_task_data(names, task_data, manager.task_index, num_fewshot=num_fewshot, skip=bundled)


def _evaluate(
    model,
    tokenizer,
    names,
    manager,
    limit,
    num_fewshot,
    batch_size,
    max_length,
    show_progress,
    seed,
    log_samples=False,
):
    """lm-eval's ``simple_evaluate`` with its ``HFLM`` around the in-memory model (left in its mode)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=batch_size,
            max_length=max_length,
            disable_tqdm=not show_progress,
        )
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    if output is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results (not rank 0 of a distributed run)")
    return output


def model_index_results(downstream: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
    """``{task: {metric: value}}`` -> keyword arguments of ``huggingface_hub.EvalResult``, one per metric.

    Standard errors are left out; task types follow the Hub's names (multiple-choice, translation).
    """
    entries = []
    for task, metrics in downstream.items():
        match = _TRANSLATION_RE.match(task)
        if _CONTINUATION_RE.match(task):
            task_type, task_name = "multiple-choice", "Next-sentence choice"
        elif match:
            task_type, task_name = "translation", f"Translation {match['src']}->{match['tgt']}"
        else:
            task_type, task_name = "text-generation", task
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            entries.append(
                {
                    "task_type": task_type,
                    "task_name": task_name,
                    "dataset_type": task,
                    "dataset_name": task,
                    "metric_type": metric,
                    "metric_name": f"{metric} ({task})",
                    "metric_value": round(float(value), 4),
                    "source_name": "lm-evaluation-harness",
                    "source_url": "https://github.com/EleutherAI/lm-evaluation-harness",
                }
            )
    return entries
