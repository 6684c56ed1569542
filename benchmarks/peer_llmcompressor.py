"""Us against llm-compressor: Wanda and SparseGPT (and our M-Wanda) on the same tokens, the same held-out sets.

llm-compressor (PyPI ``llmcompressor``) pins its own transformers, so this script creates a separate
virtualenv for it (``--peer-venv``, default ``~/.cache/optimum_mwanda/peer-venv``; torch's local CPU wheel
``torch==2.13.0`` first, then ``llmcompressor==0.14.0.1``, the newest release, which accepts torch 2.10-2.14).
Then, on Gemma 3 270M (the demo model folder, ``optimum_mwanda.demo.demo_model_path()``):

1. the calibration set of ``benchmarks/multilingual_study.py`` (bundled corpus, 7 languages x 8 x 512
   tokens, seed 0) is built once and saved as a safetensors file: both tools get exactly these token ids,
   in the same order and batch size;
2. every pruning run is its own process with ``--threads`` torch threads (ours in this venv, llm-compressor's
   ``WandaPruningModifier`` / ``SparseGPTModifier`` through ``oneshot`` in its venv, by
   ``peer_llmcompressor_worker.py``). Each process first times one plain forward pass of the decoder over
   the calibration tokens (``prune_speed.forward_seconds``: the floor), then prunes; it reports seconds, the
   ratio to its own floor and its peak RSS, and saves the pruned Linear weights;
3. this process (idle while a run is timed) loads each pruned model into the dense model and scores it with
   our ``evaluate_perplexity`` on the study's held-out windows: 4 windows of 512 tokens per calibration
   language and 2 per language absent from calibration (the study's fr/it/tr/vi; ``--absent-languages all``
   scores all 14 other bundled languages);
4. with ``--downstream`` (needs ``optimum_mwanda.evaluation.run_downstream``), the downstream tasks too.

Results are saved after every run (``--output``.json, rerun to resume; ``--report-only`` rewrites the md).

Usage (the committed results came from the command recorded in the markdown output)::

    nice -n 5 python benchmarks/peer_llmcompressor.py                         # 50%, all five tools
    nice -n 5 python benchmarks/peer_llmcompressor.py --structures 50 2:4     # and 2:4
    python benchmarks/peer_llmcompressor.py --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_OUTPUT = RESULTS / "peer_llmcompressor"
WORKER = HERE / "peer_llmcompressor_worker.py"
LLMCOMPRESSOR_REQUIREMENT = "llmcompressor==0.14.0.1"
TORCH_REQUIREMENT = "torch==2.13.0"  # the local CPU wheel; an unpinned torch pulls a multi-GB CUDA build
CALIBRATION_LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]
STUDY_ABSENT_LANGUAGES = ["fr", "it", "tr", "vi"]
TOOLS = {"ours": ("wanda", "sparsegpt", "mwanda"), "llmc": ("wanda", "sparsegpt")}
TOOL_LABELS = {"ours": "optimum-mwanda", "llmc": "llm-compressor"}
METHOD_LABELS = {"wanda": "Wanda", "sparsegpt": "SparseGPT", "mwanda": "M-Wanda"}
# The independent measurement quoted in issue 13 (same model, 7 x 8 x 512 tokens, 50%, 23 held-out sets),
# printed next to ours for orientation only: nothing here is tuned to it.
REFERENCE = (
    "llm-compressor's Wanda matched our Wanda to 0.5%; its SparseGPT was 0.90x our Wanda overall (0.77x "
    "in-domain, 1.08x on text far from the calibration domain); our M-Wanda was 0.94x its SparseGPT overall, "
    "1.05x in-domain; prune time as a multiple of the floor: our Wanda 1.79x vs its 2.35x, our SparseGPT 2.32x "
    "vs its 3.65x, our M-Wanda 1.82x"
)


# ---------------------------------------------------------------------------------------------------------
# run names (pure)
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One pruning run: ``tool`` ("ours" or "llmc"), ``method``, and ``structure`` ("50" = 50% unstructured,
    or "N:M"); ``dense`` is the unpruned model."""

    tool: str
    method: str
    structure: str = ""

    @property
    def name(self) -> str:
        return "dense" if self.tool == "dense" else f"{self.tool}-{self.method}@{self.structure}"

    @property
    def sparsity(self) -> float:
        if self.tool == "dense":
            return 0.0
        if ":" in self.structure:
            n, m = (int(x) for x in self.structure.split(":"))
            return 1.0 - n / m
        return float(self.structure) / 100.0

    @property
    def mask_structure(self) -> str:
        """Our notation: ``unstructured`` or ``N:M``."""
        return self.structure if ":" in self.structure else "unstructured"

    @property
    def llmc_mask_structure(self) -> str:
        """llm-compressor's notation: ``0:0`` (unstructured) or ``N:M``."""
        return self.structure if ":" in self.structure else "0:0"

    @property
    def label(self) -> str:
        if self.tool == "dense":
            return "dense"
        return f"{TOOL_LABELS[self.tool]} {METHOD_LABELS[self.method]}"


def parse_structure(text: str) -> str:
    """``"50"`` / ``"50%"`` / ``"0.5"`` -> ``"50"``; ``"2:4"`` -> ``"2:4"``. Raises ``ValueError``."""
    text = text.strip().rstrip("%")
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"malformed N:M structure {text!r}")
        n, m = int(parts[0]), int(parts[1])
        if not 0 < n < m:
            raise ValueError(f"N:M structure {text!r} needs 0 < N < M")
        return f"{n}:{m}"
    try:
        value = float(text)
    except ValueError as err:
        raise ValueError(f"sparsity {text!r} is neither a percentage nor N:M") from err
    percent = value * 100 if value < 1 else value
    if not 0 < percent < 100:
        raise ValueError(f"sparsity {text!r} must lie strictly between 0 and 100%")
    return f"{percent:g}"


def parse_run(name: str) -> RunSpec:
    """``dense`` or ``TOOL-METHOD@STRUCTURE`` (e.g. ``llmc-sparsegpt@2:4``). Raises ``ValueError``."""
    name = name.strip()
    if name == "dense":
        return RunSpec("dense", "dense")
    head, sep, structure = name.partition("@")
    tool, dash, method = head.partition("-")
    if not sep or not dash:
        raise ValueError(f"malformed run name {name!r}: use TOOL-METHOD@STRUCTURE, e.g. ours-wanda@50")
    if tool not in TOOLS:
        raise ValueError(f"unknown tool {tool!r} in {name!r}; known: {', '.join(TOOLS)}")
    if method not in TOOLS[tool]:
        raise ValueError(f"{TOOL_LABELS[tool]} has no method {method!r}; known: {', '.join(TOOLS[tool])}")
    return RunSpec(tool, method, parse_structure(structure))


def expand_runs(requested: Sequence[str], structures: Sequence[str]) -> list[RunSpec]:
    """``all`` -> dense plus every tool and method per structure; ``TOOL-METHOD`` without ``@`` -> one per
    structure; duplicates dropped, order kept."""
    parsed = [parse_structure(s) for s in structures]
    names: list[str] = []
    for item in requested:
        if item == "all":
            names.append("dense")
            names += [f"{t}-{m}@{s}" for s in parsed for t, methods in TOOLS.items() for m in methods]
        elif item != "dense" and "@" not in item:
            names += [f"{item}@{s}" for s in parsed]
        else:
            names.append(item)
    return _study().unique_by_name(names, parse_run)


# ---------------------------------------------------------------------------------------------------------
# summaries (pure)
# ---------------------------------------------------------------------------------------------------------
def _study():
    """benchmarks/multilingual_study.py (stdlib-only at import), whose geometric mean and windows we reuse."""
    if "multilingual_study" not in sys.modules:
        spec = importlib.util.spec_from_file_location("multilingual_study", HERE / "multilingual_study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["multilingual_study"] = module  # its dataclasses look the module up by name
        spec.loader.exec_module(module)
    return sys.modules["multilingual_study"]


def geometric_mean(values: Sequence[float]) -> float:
    """The study's geometric mean: ``nan`` when empty or when a value is not a finite positive."""
    return _study().geometric_mean(values)


def language_groups(record: Mapping[str, Any], calibration_languages: Sequence[str]) -> dict[str, list[str]]:
    """The held-out languages of a record split into ``in`` (calibration languages), ``absent`` (all others
    scored), ``study_absent`` (the study's fr/it/tr/vi, where scored) and ``all``."""
    scored = list(record.get("perplexity", {}))
    inside = [lang for lang in calibration_languages if lang in scored]
    absent = [lang for lang in scored if lang not in calibration_languages]
    return {
        "in": inside,
        "absent": absent,
        "study_absent": [lang for lang in STUDY_ABSENT_LANGUAGES if lang in absent],
        "all": inside + absent,
    }


def summarize(record: Mapping[str, Any], calibration_languages: Sequence[str]) -> dict[str, float]:
    """Geometric-mean perplexity of one record per language group (see :func:`language_groups`)."""
    ppl = record.get("perplexity", {})
    groups = language_groups(record, calibration_languages)
    return {group: geometric_mean([ppl[lang] for lang in langs]) for group, langs in groups.items()}


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return math.nan
    return a / b


def pairwise_ratios(
    results: Mapping[str, Mapping[str, Any]], structure: str, calibration_languages: Sequence[str]
) -> list[dict[str, Any]]:
    """The head-to-head comparisons at one structure: perplexity ratios per language group (below 1: the
    first is better) and the ratio of their floor multiples (below 1: the first is faster)."""
    pairs = [
        ("llmc-wanda", "ours-wanda"),
        ("llmc-sparsegpt", "ours-sparsegpt"),
        ("llmc-sparsegpt", "ours-wanda"),
        ("ours-mwanda", "llmc-sparsegpt"),
        ("ours-mwanda", "ours-wanda"),
        ("ours-mwanda", "llmc-wanda"),
    ]
    rows = []
    for a, b in pairs:
        ra, rb = results.get(f"{a}@{structure}"), results.get(f"{b}@{structure}")
        if not ra or not rb or "perplexity" not in ra or "perplexity" not in rb:
            continue
        sa, sb = summarize(ra, calibration_languages), summarize(rb, calibration_languages)
        row: dict[str, Any] = {"pair": f"{a} / {b}"}
        for group in ("all", "in", "absent", "study_absent"):
            row[group] = ratio(sa[group], sb[group])
        row["time"] = ratio(
            ra.get("timing", {}).get("ratio_to_floor"), rb.get("timing", {}).get("ratio_to_floor")
        )
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1000 else f"{value:.0f}"


def perplexity_table(
    results: Mapping[str, Mapping[str, Any]], order: Sequence[str], calibration_languages: Sequence[str]
) -> str:
    """Markdown: a row per run, a column per held-out language (absent ones marked *), the geometric means
    (in-domain calibration languages, absent languages, the study's 4 absent ones, all)."""
    present = [results[n] for n in order if n in results and "perplexity" in results[n]]
    if not present:
        return "(no perplexity measured yet)"
    groups = language_groups(present[0], calibration_languages)
    header = [
        "run",
        *groups["in"],
        "**geomean in**",
        *(f"{lang}*" for lang in groups["absent"]),
        "**geomean absent***",
        "geomean fr/it/tr/vi*",
        "geomean all",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in order:
        record = results.get(name)
        if not record or "perplexity" not in record:
            continue
        ppl, summary = record["perplexity"], summarize(record, calibration_languages)
        row = [
            f"{parse_run(name).label}{'' if name == 'dense' else ' @' + parse_run(name).structure}",
            *(_fmt(ppl.get(lang)) for lang in groups["in"]),
            f"**{_fmt(summary['in'])}**",
            *(_fmt(ppl.get(lang)) for lang in groups["absent"]),
            f"**{_fmt(summary['absent'])}**",
            _fmt(summary["study_absent"]),
            _fmt(summary["all"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def timing_table(results: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> str:
    """Markdown: seconds, the floor of the same process, their ratio, peak RSS, load average, sparsity."""
    lines = [
        "| run | prune s | floor s (same process) | x floor | peak RSS floor+prune (MB) | peak RSS process (MB) "
        "| load avg 1 min | sparsity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in order:
        timing = results.get(name, {}).get("timing")
        if not timing:
            continue
        spec = parse_run(name)
        lines.append(
            f"| {spec.label} @{spec.structure} | {_fmt(timing['seconds'])} | {_fmt(timing['floor_seconds'])} "
            f"| {_fmt(timing['ratio_to_floor'], 2)} | {_fmt(timing.get('peak_rss_after_load_mb'), 0)} | "
            f"{_fmt(timing['peak_rss_mb'], 0)} | "
            f"{_fmt(timing['load_average_1min'], 2)} | {_fmt(timing.get('achieved_sparsity'), 4)} |"
        )
    return "\n".join(lines)


def ratio_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        "| A / B | perplexity, all | in-domain | absent | fr/it/tr/vi | time (x floor) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['pair']} | {_fmt(row['all'], 3)} | {_fmt(row['in'], 3)} | {_fmt(row['absent'], 3)} | "
            f"{_fmt(row['study_absent'], 3)} | {_fmt(row['time'], 2)} |"
        )
    return "\n".join(lines)


def downstream_table(results: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> str | None:
    """Markdown of the downstream scores (``record["downstream"] = {task: {metric: value}}``), or ``None``.

    One table per task family and metric (``mwanda_continuation_de`` is family ``mwanda_continuation``,
    column ``de``), languages as columns plus their arithmetic mean, as lm-eval aggregates a group;
    ``sample_len`` (the number of documents) goes into the heading instead of a column.
    """
    scored = [n for n in order if results.get(n, {}).get("downstream")]
    if not scored:
        return None
    tables: dict[tuple[str, str], list[str]] = {}
    sizes: dict[str, set[int]] = {}
    for name in scored:
        for task, metrics in results[name]["downstream"].items():
            family, _, column = task.rpartition("_")
            family, column = (family, column) if family else (task, "score")
            for metric, value in metrics.items():
                if metric == "sample_len":
                    sizes.setdefault(family, set()).add(int(value))
                    continue
                columns = tables.setdefault((family, metric), [])
                if column not in columns:
                    columns.append(column)
    blocks = []
    for (family, metric), columns in tables.items():
        n = sizes.get(family)
        heading = f"**{family}, {metric}**" + (
            f" ({'/'.join(str(v) for v in sorted(n))} documents per language)" if n else ""
        )
        lines = [heading, "", "| run | " + " | ".join([*columns, "mean"]) + " |"]
        lines.append("|---|" + "---:|" * (len(columns) + 1))
        for name in scored:
            scores = results[name]["downstream"]
            values = [
                scores.get(f"{family}_{c}" if c != "score" else family, {}).get(metric) for c in columns
            ]
            finite = [v for v in values if v is not None]
            mean = sum(finite) / len(finite) if finite and len(finite) == len(values) else None
            spec = parse_run(name)
            label = spec.label if name == "dense" else f"{spec.label} @{spec.structure}"
            lines.append("| " + " | ".join([label, *(_fmt(v, 3) for v in values), _fmt(mean, 3)]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def ordered_names(results: Mapping[str, Any]) -> list[str]:
    """Dense first, then per structure (50 before 2:4): ours, then llm-compressor, Wanda before SparseGPT."""
    structures: list[str] = []
    for name in results:
        if name != "dense":
            s = parse_run(name).structure
            if s not in structures:
                structures.append(s)
    structures.sort(key=lambda s: (":" in s, s))
    order = ["dense"] if "dense" in results else []
    for s in structures:
        for tool, methods in TOOLS.items():
            order += [f"{tool}-{m}@{s}" for m in methods if f"{tool}-{m}@{s}" in results]
    return order


def render_report(cache: Mapping[str, Any]) -> str:
    """The markdown report of a results cache."""
    results = cache.get("results", {})
    settings = cache.get("settings", {})
    env = cache.get("environment", {})
    languages = settings.get("languages", CALIBRATION_LANGUAGES)
    order = ordered_names(results)
    lines = [
        "# optimum-mwanda vs llm-compressor on Gemma 3 270M",
        "",
        *(f"> {note}\n" for note in cache.get("notes", [])),
        "Command(s): " + " && ".join(f"`{c}`" for c in cache.get("commands", [])),
        "",
        "- Model: the demo Gemma 3 270M folder (Q4_K_M GGUF dequantized to float32), the same folder for "
        "both tools.",
        f"- Calibration: bundled corpus, {len(languages)} languages ({', '.join(languages)}) x "
        f"{settings.get('samples_per_language')} x {settings.get('seq_len')} tokens, seed "
        f"{settings.get('seed')}, batch {settings.get('batch_size')}: the token ids of "
        "`benchmarks/multilingual_study.py`, saved once and given to both tools (llm-compressor through a "
        "`DataLoader`, so no resampling or re-tokenization).",
        f"- Held-out: our `evaluate_perplexity`, non-overlapping {settings.get('eval_seq_len')}-token windows, "
        f"the first {settings.get('max_windows')} per calibration language and "
        f"{settings.get('absent_max_windows')} per absent language (marked *). All of the bundled corpus is "
        "one domain (the Debian Administrator's Handbook; Swahili: Kolibri's strings), so 'absent' means "
        "other languages, not other domains.",
        "- llm-compressor: "
        + (
            f"{env.get('llmcompressor', {}).get('llmcompressor', '?')} in its own venv (torch "
            f"{env.get('llmcompressor', {}).get('torch', '?')}, transformers "
            f"{env.get('llmcompressor', {}).get('transformers', '?')}), `oneshot` with its default "
            "pipeline, `ignore=['re:.*lm_head']` (we never prune the LM head; it is tied to the embeddings), "
            "everything else at the modifiers' defaults (SparseGPT block 128, dampening 0.01)."
        ),
        f"- optimum-mwanda: torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
        "config defaults (M-Wanda: per-language mean and rank-32 low-rank compensation, depth schedule).",
        f"- Machine: {env.get('platform', '?')}, {settings.get('threads')} torch threads per run (see the "
        "load average per run and the notes above for what else ran; `uptime` at the start: "
        f"{cache.get('uptime_start', '?')}; at the end: {cache.get('uptime_end', '?')}).",
        "",
        "## Held-out perplexity",
        "",
        perplexity_table(results, order, languages),
        "",
        "## Prune time and memory",
        "",
        "Each run is one fresh process; `floor` is one plain forward pass of the decoder (no LM head) over the "
        "same calibration tokens, timed in that process right before the run, so the ratio compares two "
        "timings under the same load. Peak RSS: 'floor+prune' is the high-water mark from the floor pass on (reset "
        "through /proc/self/clear_refs after the model is loaded: the loaded model plus what the tool adds); "
        "'process' includes loading the checkpoint, which peaks higher in transformers.",
        "",
        timing_table(results, order),
    ]
    structures = []
    for name in order:
        if name != "dense" and parse_run(name).structure not in structures:
            structures.append(parse_run(name).structure)
    for s in structures:
        rows = pairwise_ratios(results, s, languages)
        if rows:
            lines += [
                "",
                f"## Head to head at {s if ':' in s else s + '%'}",
                "",
                "Ratios A / B of geometric-mean perplexity (below 1: A is better) and of the floor multiples "
                "(below 1: A is faster).",
                "",
                ratio_table(rows),
            ]
    if cache.get("mask_agreement"):
        lines += [
            "",
            "## Same masks?",
            "",
            "Fraction of weights both tools pruned or both kept, and of the weights both kept whose values are "
            "equal (SparseGPT updates the kept weights).",
            "",
            "| runs | same mask | same value (kept in both) |",
            "|---|---:|---:|",
        ]
        for pair, agreement in cache["mask_agreement"].items():
            lines.append(
                f"| {pair} | {_fmt(agreement['same_mask'], 4)} | {_fmt(agreement['same_value'], 4)} |"
            )
    downstream = downstream_table(results, order)
    lines += ["", "## Downstream", ""]
    if downstream:
        lines += [cache.get("downstream_note", ""), "", downstream]
    else:
        lines.append(
            cache.get("downstream_note")
            or "Not measured in this run (`--downstream` scores the saved models)."
        )
    lines += [
        "",
        "## The independent reference point (issue 13), for orientation",
        "",
        f"Measured elsewhere on 23 held-out sets of several domains: {REFERENCE}. Not a target: the "
        "numbers above are what this run measured.",
    ]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["all"],
        help="'all', 'dense', TOOL-METHOD (over --structures) or TOOL-METHOD@STRUCTURE; tools: ours "
        "(wanda, sparsegpt, mwanda), llmc (wanda, sparsegpt)",
    )
    parser.add_argument("--structures", nargs="+", default=["50"], help="percentages and/or N:M, e.g. 50 2:4")
    parser.add_argument("--languages", nargs="+", default=CALIBRATION_LANGUAGES)
    parser.add_argument(
        "--absent-languages",
        nargs="*",
        default=STUDY_ABSENT_LANGUAGES,
        help="held-out languages absent from calibration (default: the study's fr it tr vi; 'all': every "
        "other bundled language)",
    )
    parser.add_argument("--samples-per-language", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=4, help="windows per calibration language")
    parser.add_argument("--absent-max-windows", type=int, default=2, help="windows per absent language")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--peer-venv",
        type=Path,
        default=Path.home() / ".cache" / "optimum_mwanda" / "peer-venv",
        help="llm-compressor's virtualenv (created when missing)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path.home() / ".cache" / "optimum_mwanda" / "peer-runs",
        help="calibration file and pruned weights",
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="path without suffix")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="with --report-only/--merge: a sentence shown at the top of the report (repeatable; replaces "
        "the notes stored before)",
    )
    parser.add_argument("--setup-only", action="store_true", help="create the peer venv and stop")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate the pruned weights already in --work-dir (no pruning, no timing); with its own "
        "--output, it can run beside a --timing-only run and be merged in with --merge",
    )
    _study().add_merge_argument(
        parser, "copy the evaluations (perplexity, downstream) of other outputs into --output, then report"
    )
    parser.add_argument(
        "--timing-only",
        action="store_true",
        help="prune and time every run, evaluate nothing (a later run without it evaluates the saved "
        "weights): keeps this process idle while every timing runs",
    )
    parser.add_argument(
        "--downstream",
        action="store_true",
        help="also score every saved model on the downstream tasks (optimum_mwanda.evaluation.run_downstream)",
    )
    parser.add_argument(
        "--downstream-tasks",
        nargs="*",
        default=None,
        help="default: run_downstream's (the continuation task)",
    )
    parser.add_argument(
        "--downstream-languages", nargs="*", default=None, help="default: the calibration languages"
    )
    parser.add_argument(
        "--downstream-limit", type=int, default=20, help="examples per task (lm-eval --limit)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--calibration-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights-out", type=Path, help=argparse.SUPPRESS)
    return parser


def settings_key(args: argparse.Namespace) -> dict[str, Any]:
    """What a cached record must share with this run to be reused."""
    return {
        "languages": list(args.languages),
        "absent_languages": args.absent_languages,
        "samples_per_language": args.samples_per_language,
        "seq_len": args.seq_len,
        "eval_seq_len": args.eval_seq_len,
        "max_windows": args.max_windows,
        "absent_max_windows": args.absent_max_windows,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "threads": args.threads,
    }


# ---------------------------------------------------------------------------------------------------------
# orchestration (needs torch, optimum_mwanda, and llm-compressor's venv)
# ---------------------------------------------------------------------------------------------------------
def _load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_peer_venv(path: Path) -> Path:
    """llm-compressor's virtualenv, created when missing: torch's CPU wheel first, then llm-compressor."""
    python = path / "bin" / "python"
    if python.exists():
        probe = subprocess.run(
            [str(python), "-c", "import llmcompressor, torch; print(llmcompressor.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0:
            return python
    print(f"[peer] creating llm-compressor's venv in {path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    for requirement in (TORCH_REQUIREMENT, LLMCOMPRESSOR_REQUIREMENT):
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", requirement], check=True)
    return python


def _atomic_write(path: Path, text: str) -> None:
    from optimum_mwanda.files import write_file  # the package's one atomic writer

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, text, durable=False)


def _uptime() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return out or "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _save_calibration(calibration, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(
        {
            "input_ids": calibration.input_ids.contiguous(),
            "attention_mask": calibration.attention_mask.contiguous(),
        },
        str(tmp),
        metadata={"languages": json.dumps(calibration.languages)},
    )
    tmp.replace(path)


def _load_calibration(path: Path):
    from safetensors import safe_open

    from optimum_mwanda.calibration import CalibrationSet

    with safe_open(str(path), framework="pt") as f:
        languages = json.loads(f.metadata()["languages"])
        return CalibrationSet(f.get_tensor("input_ids"), f.get_tensor("attention_mask"), languages)


def _linear_weights(model) -> dict:
    import torch

    return {
        f"{name}.weight": module.weight.detach().contiguous()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }


def our_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One run of our pruner in this process: floor, then ``Pruner.prune_model`` (as prune_speed.py)."""
    import resource

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from optimum_mwanda import Pruner
    from optimum_mwanda.configuration import config_class_for_method
    from optimum_mwanda.demo import demo_model_path

    torch.set_num_threads(args.threads)
    spec = parse_run(args.worker)
    calibration = _load_calibration(args.calibration_file)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path(), dtype=torch.float32)
    model.eval()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result: dict[str, Any] = {"tokens": int(calibration.attention_mask.sum())}
    prune_speed = _load_module("prune_speed")
    prune_speed.reset_peak_rss()  # loading peaks above pruning; measure floor + pruning on their own
    result["floor_seconds"] = prune_speed.forward_seconds(
        model.get_decoder(), calibration.input_ids, calibration.attention_mask, args.batch_size
    )
    config = config_class_for_method(spec.method)(
        sparsity=spec.sparsity,
        mask_structure=spec.mask_structure,
        samples_per_language=args.samples_per_language,
        calibration_seq_len=args.seq_len,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    start = time.perf_counter()
    report = Pruner(config).prune_model(model, calibration, show_progress=False)
    result["seconds"] = time.perf_counter() - start
    result["ratio_to_floor"] = result["seconds"] / result["floor_seconds"]
    result["load_average_1min"] = os.getloadavg()[0]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_after_load_mb"] = rss_loaded
    result["peak_rss_after_load_mb"] = prune_speed.peak_rss_mb()
    result["achieved_sparsity"] = report.achieved_sparsity
    result["phases"] = report.timings
    result["config"] = config.to_dict()
    tmp = args.weights_out.with_name(args.weights_out.name + ".partial")
    save_file(_linear_weights(model), str(tmp))
    tmp.replace(args.weights_out)
    return result


def _run_worker(spec: RunSpec, args: argparse.Namespace, peer_python: Path | None, calib: Path, out: Path):
    common = ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if spec.tool == "ours":
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            spec.name,
            "--calibration-file",
            str(calib),
            "--weights-out",
            str(out),
            "--samples-per-language",
            str(args.samples_per_language),
            "--seq-len",
            str(args.seq_len),
            "--seed",
            str(args.seed),
            *common,
        ]
    else:
        from optimum_mwanda.demo import demo_model_path

        command = [
            str(peer_python),
            str(WORKER),
            "--model-dir",
            str(demo_model_path()),
            "--calibration",
            str(calib),
            "--method",
            spec.method,
            "--sparsity",
            str(spec.sparsity),
            "--mask-structure",
            spec.llmc_mask_structure,
            "--output",
            str(out),
            *common,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    log = out.with_suffix(".log")
    with log.open("w") as handle:
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=handle, text=True, env=env, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{spec.name} failed (exit {proc.returncode}); log: {log}")
    return json.loads(line[len("RESULT ") :])


def run_downstream_scores(model, tokenizer, args: argparse.Namespace) -> dict[str, dict[str, float]] | None:
    """Downstream scores through ``optimum_mwanda.evaluation.run_downstream`` when that API exists."""
    try:
        from optimum_mwanda.evaluation import run_downstream  # type: ignore[attr-defined]
    except ImportError:
        return None
    kwargs: dict[str, Any] = {
        "limit": args.downstream_limit,
        "languages": args.downstream_languages or list(args.languages),
        "show_progress": False,
    }
    if args.downstream_tasks:
        kwargs["tasks"] = args.downstream_tasks
    raw = run_downstream(model, tokenizer, **kwargs)
    return normalize_downstream(raw)


def normalize_downstream(raw: Any) -> dict[str, dict[str, float]]:
    """``{task: {metric: float}}`` from a ``DownstreamResult`` (its ``eval_results()``), an lm-eval result
    (``{"results": {task: {"acc,none": x}}}``) or a flat mapping; non-numbers and standard errors dropped."""
    if hasattr(raw, "eval_results"):
        raw = raw.eval_results()
    table = raw.get("results", raw) if isinstance(raw, Mapping) else {}
    out: dict[str, dict[str, float]] = {}
    for task, metrics in table.items():
        if not isinstance(metrics, Mapping):
            continue
        kept = {
            str(k).split(",")[0]: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in str(k)
        }
        if kept:
            out[str(task)] = kept
    return out


def weights_file(work_dir: Path, name: str) -> Path:
    """Where a run's pruned Linear weights live (``:`` and ``@`` kept out of file names)."""
    return work_dir / f"{name.replace(':', 'of').replace('@', '-')}.safetensors"


def mask_agreement(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float]:
    """How alike two pruned models' masks are: ``{"same_mask": fraction of weights pruned in both or kept
    in both, "same_value": fraction of kept-in-both weights whose values are equal}`` (tensors by name)."""
    if set(a) != set(b):
        raise ValueError("the two pruned models hold different modules")
    same = total = kept_both = kept_equal = 0
    for name, wa in a.items():
        wb = b[name]
        za, zb = wa == 0, wb == 0
        same += int((za == zb).sum())
        total += wa.numel()
        both = ~za & ~zb
        kept_both += int(both.sum())
        kept_equal += int((both & (wa == wb)).sum())
    return {"same_mask": same / total, "same_value": kept_equal / kept_both if kept_both else math.nan}


def mask_agreements(work_dir: Path, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """:func:`mask_agreement` of ours and llm-compressor's run of each method and structure whose weights
    are both in ``work_dir``."""
    from safetensors.torch import load_file

    out = {}
    for name in names:
        spec = parse_run(name)
        if spec.tool != "ours" or spec.method not in TOOLS["llmc"]:
            continue
        theirs = f"llmc-{spec.method}@{spec.structure}"
        a, b = weights_file(work_dir, name), weights_file(work_dir, theirs)
        if a.is_file() and b.is_file():
            out[f"{name} vs {theirs}"] = mask_agreement(load_file(str(a)), load_file(str(b)))
    return out


class _TimingOnlyDone(Exception):
    """A --timing-only run has timed its worker: nothing to evaluate."""


EVALUATION_FIELDS = ("perplexity", "scored_tokens", "eval_seconds", "downstream")
EVALUATION_SETTINGS = ("absent_languages", "eval_seq_len", "max_windows", "absent_max_windows")


def merge_evaluations(cache: dict[str, Any], others: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Copy the evaluation fields (and timings of runs ``cache`` lacks) of ``others``' records into ``cache``.

    The calibration settings must match (the pruned weights are the same files); the evaluation settings
    (windows) are taken from ``others``, which must agree among themselves and with any evaluation
    ``cache`` already holds. A field ``cache`` already has is kept. Raises ``ValueError`` otherwise.
    """

    def split(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        calibration = {k: v for k, v in settings.items() if k not in EVALUATION_SETTINGS and k != "threads"}
        return calibration, {k: v for k, v in settings.items() if k in EVALUATION_SETTINGS}

    mine, my_eval = split(cache.get("settings", {}))
    evaluated = any(
        f in r for r in cache.get("results", {}).values() for f in EVALUATION_FIELDS if f != "downstream"
    )
    for other in others:
        theirs, their_eval = split(other.get("settings", {}))
        if theirs != mine:
            raise ValueError(f"cannot merge results of other calibration settings: {theirs} vs {mine}")
        if evaluated and their_eval != my_eval:
            raise ValueError(f"cannot merge evaluations of other windows: {their_eval} vs {my_eval}")
        cache.setdefault("settings", {}).update(their_eval)
        my_eval, evaluated = their_eval, True
        cache["evaluation_threads"] = other.get("settings", {}).get("threads")
        for name, record in other.get("results", {}).items():
            target = cache.setdefault("results", {}).setdefault(name, {})
            for field in (*EVALUATION_FIELDS, "timing"):
                if field in record and field not in target:
                    target[field] = record[field]
            if "llmcompressor" in other.get("environment", {}):
                cache.setdefault("environment", {}).setdefault(
                    "llmcompressor", other["environment"]["llmcompressor"]
                )
        for command in other.get("commands", []):
            if command not in cache.setdefault("commands", []):
                cache["commands"].append(command)
        if other.get("downstream_note") and not cache.get("downstream_note"):
            cache["downstream_note"] = other["downstream_note"]
    return cache


def run(args: argparse.Namespace, runs: Sequence[RunSpec], command: str) -> dict[str, Any]:
    import torch
    import transformers
    from safetensors.torch import load_file

    from optimum_mwanda.calibration import available_languages, load_bundled_corpus
    from optimum_mwanda.demo import load_demo_model
    from optimum_mwanda.evaluation import evaluate_perplexity

    torch.set_num_threads(args.threads)
    json_path = args.output.with_suffix(".json")
    cache: dict[str, Any] = (
        json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {"results": {}}
    )
    key = settings_key(args)
    if cache.get("settings") not in (None, key):
        print("[peer] settings changed: earlier results are not reused", flush=True)
        cache = {"results": {}}
    cache["settings"] = key
    results: dict[str, Any] = cache.setdefault("results", {})
    if command not in cache.setdefault("commands", []):
        cache["commands"].append(command)
    cache["uptime_start"] = _uptime()
    cache["environment"] = {
        **cache.get("environment", {}),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }

    def save() -> None:
        _atomic_write(json_path, json.dumps(cache, indent=2) + "\n")
        _atomic_write(args.output.with_suffix(".md"), render_report(cache))

    def done(spec: RunSpec) -> bool:
        record = results.get(spec.name, {})
        if args.timing_only:
            return spec.tool == "dense" or "timing" in record
        return "perplexity" in record and (not args.downstream or "downstream" in record)

    todo = [spec for spec in runs if not done(spec)]
    if not todo:
        return cache
    needs_peer = not args.eval_only and any(s.tool == "llmc" for s in todo)
    peer_python = ensure_peer_venv(args.peer_venv) if needs_peer else None

    if args.timing_only:
        # This process only waits on the timed workers: no model in memory (room for a parallel run).
        from transformers import AutoTokenizer

        from optimum_mwanda.demo import demo_model_path

        model, tokenizer, dense = None, AutoTokenizer.from_pretrained(demo_model_path()), None
    else:
        model, tokenizer = load_demo_model(dtype=torch.float32)
        dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    args.work_dir.mkdir(parents=True, exist_ok=True)
    calib_file = args.work_dir / "calibration.safetensors"
    if not args.eval_only:
        calibration = _study().study_calibration(tokenizer, args)
        _save_calibration(calibration, calib_file)
    absent = (
        [lang for lang in available_languages() if lang not in args.languages]
        if args.absent_languages == ["all"]
        else args.absent_languages
    )
    heldout = load_bundled_corpus("heldout", args.languages)
    heldout_absent = load_bundled_corpus("heldout", absent) if absent else {}

    loss_impl = "auto"  # checked against the full logits once, then reused (as the study does)

    def evaluate() -> dict[str, Any]:
        nonlocal loss_impl
        start = time.perf_counter()
        scores, tokens = {}, {}
        for texts, windows in ((heldout, args.max_windows), (heldout_absent, args.absent_max_windows)):
            if not texts:
                continue
            res = evaluate_perplexity(
                model, tokenizer, texts, seq_len=args.eval_seq_len, max_windows=windows,
                show_progress=False, return_details=True, loss_impl=loss_impl,
            )  # fmt: skip
            loss_impl = res.loss_impl
            scores.update(res.perplexities)
            tokens.update(res.tokens)
        return {"perplexity": scores, "scored_tokens": tokens, "eval_seconds": time.perf_counter() - start}

    for i, spec in enumerate(todo, 1):
        print(f"[peer] ({i}/{len(todo)}) {spec.name}", flush=True)
        record = results.get(spec.name, {})
        if model is not None:
            model.load_state_dict(dense)
        weights = weights_file(args.work_dir, spec.name)
        if args.eval_only and spec.tool != "dense" and not weights.is_file():
            print(f"[peer] {spec.name}: no pruned weights yet, skipped", flush=True)
            continue
        try:
            if spec.tool != "dense":
                if not args.eval_only and ("timing" not in record or not weights.is_file()):
                    record = {"timing": _run_worker(spec, args, peer_python, calib_file, weights)}
                    if spec.tool == "llmc":
                        cache["environment"]["llmcompressor"] = record["timing"].get("versions", {})
                    print(
                        f"[peer] {spec.name}: {record['timing']['seconds']:.1f} s = "
                        f"{record['timing']['ratio_to_floor']:.2f} x floor, peak RSS "
                        f"{record['timing']['peak_rss_mb']:.0f} MB, load {record['timing']['load_average_1min']:.2f}",
                        flush=True,
                    )
                if args.timing_only:
                    raise _TimingOnlyDone
                pruned = load_file(str(weights))
                expected = _linear_weights(model)
                if set(pruned) != set(expected):
                    raise RuntimeError(f"{weights} holds other modules than the model's Linear layers")
                with torch.no_grad():
                    for name, tensor in pruned.items():
                        expected[name].copy_(tensor)
            if args.timing_only:
                pass
            elif "perplexity" not in record:
                record.update(evaluate())
                print(
                    f"[peer] {spec.name}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in record["perplexity"].items()),
                    flush=True,
                )
            if args.downstream and "downstream" not in record:
                scores = run_downstream_scores(model, tokenizer, args)
                if scores is None:
                    cache["downstream_note"] = (
                        "Not measured: this checkout has no optimum_mwanda.evaluation.run_downstream."
                    )
                else:
                    record["downstream"] = scores
                    cache["downstream_note"] = f"lm-evaluation-harness, --limit {args.downstream_limit}."
        except _TimingOnlyDone:
            pass
        except (RuntimeError, ValueError) as err:
            record["error"] = f"{type(err).__name__}: {err}"
            print(f"[peer] {spec.name} failed: {record['error']}", flush=True)
        record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        results[spec.name] = record
        cache["uptime_end"] = _uptime()
        save()
    if model is not None:
        model.load_state_dict(dense)
    return cache


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(our_worker(args)), flush=True)
        return
    try:
        runs = expand_runs(args.runs, args.structures)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    if args.setup_only:
        print(ensure_peer_venv(args.peer_venv))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/peer_llmcompressor.py " + " ".join(shlex.quote(a) for a in argv)
    json_path = args.output.with_suffix(".json")
    if args.report_only or args.merge:
        cache = json.loads(json_path.read_text(encoding="utf-8"))
        if args.merge:
            others = [json.loads(path.read_text(encoding="utf-8")) for path in args.merge]
            try:
                cache = merge_evaluations(cache, others)
            except ValueError as err:
                raise SystemExit(str(err)) from err
        if args.note:
            cache["notes"] = list(args.note)
        agreements = mask_agreements(args.work_dir, list(cache.get("results", {})))
        if agreements:
            cache["mask_agreement"] = {**cache.get("mask_agreement", {}), **agreements}
        _atomic_write(json_path, json.dumps(cache, indent=2) + "\n")
        _atomic_write(args.output.with_suffix(".md"), render_report(cache))
    else:
        cache = run(args, runs, command.strip())
    print(render_report(cache))


if __name__ == "__main__":
    main()
