"""XCOPA (lm-evaluation-harness's own ``xcopa`` tasks, local data) on Gemma 3 270M pruned by Wanda,
SparseGPT and M-Wanda.

The configurations and the calibration are ``multilingual_study.py``'s (its code is reused: configuration
names, the calibration set of 7 languages x 8 sequences x 512 tokens with seed 0, the reload of the dense
weights before each configuration). Each model runs lm-eval's ``xcopa`` group (11 languages) through
:func:`optimum_mwanda.evaluation.run_downstream` with ``task_data`` pointing at a local copy of XCOPA's
validation split (100 items per language): lm-eval's prompts (its per-language connectives), its
log-likelihood scoring and its ``acc`` with standard errors. Per-document correctness is kept, so two
configurations are also compared *paired* (on the same items).

Every finished configuration is written at once (atomically) to the JSON, and the Markdown report is
rewritten, so a partial run is usable; a rerun with the same settings skips what is done.

Usage (the committed results came from the command recorded in the Markdown)::

    nice -n 5 python benchmarks/xcopa_study.py
    python benchmarks/xcopa_study.py --report-only
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import multilingual_study as study  # noqa: E402  (configuration names, calibration, model loading)

from optimum_mwanda.files import write_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = study.RESULTS / "xcopa_study"
XCOPA_LANGUAGES = ["et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi", "zh"]
BASES = ("wanda", "sparsegpt", "mwanda")
# Priority order: dense, 50%, 2:4, 60% (a partial run answers the first questions first).
DEFAULT_CONFIGS = [
    "dense",
    *[f"{base}@50" for base in BASES],
    *[f"{base}[mask_structure=2:4]@50" for base in BASES],
    *[f"{base}@60" for base in BASES],
]
CHANCE = 0.5


def shared_folder(*parts: str) -> Path | None:
    """``../shared/<parts>`` next to the repository (CI's layout), or next to the main checkout of a git
    worktree; ``None`` when neither exists."""
    candidates = [REPO.parent / "shared"]
    try:
        common = subprocess.run(
            ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        candidates.append(Path(common).parent.parent / "shared")
    except (OSError, subprocess.CalledProcessError):
        pass
    for base in candidates:
        if (base.joinpath(*parts)).is_dir():
            return base.joinpath(*parts)
    return None


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def settings_key(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "calibration_languages": list(args.languages),
        "samples_per_language": args.samples_per_language,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "tasks": list(args.tasks),
        "limit": args.limit,
    }


def run(
    args: argparse.Namespace, configs: Sequence[study.StudyConfig], json_path: Path, command: str
) -> dict:
    import torch

    from optimum_mwanda.evaluation.harness import prepare_task_data, run_downstream

    torch.set_num_threads(args.threads)
    cache = study.load_cache(json_path)
    commands = cache.setdefault("commands", [])
    if command not in commands:  # recorded before the first configuration: a stopped run keeps it
        commands.append(command)
    key = settings_key(args)
    results = cache.setdefault("results", {})
    todo = [
        c for c in configs if results.get(c.name, {}).get("settings") != key or "error" in results[c.name]
    ]
    done = [c.name for c in configs if c not in todo]
    if done:
        print(f"[xcopa] done before, skipped: {', '.join(done)}", flush=True)
    if not todo:
        return cache
    plan = prepare_task_data(args.tasks, args.task_data)  # fails here, before any model, if data is missing
    cache.setdefault("uptime", []).append(f"start: {_uptime()}")
    model, tokenizer = study.load_model(args.model)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = None
    for i, config in enumerate(todo, 1):
        print(f"[xcopa] ({i}/{len(todo)}) {config.name}  {_uptime()}", flush=True)
        model.load_state_dict(dense_state)
        record: dict[str, Any] = {"settings": key, "method": config.method, "sparsity": config.sparsity}
        try:
            if config.method != "dense" and calibration is None:
                calibration = study.study_calibration(tokenizer, args)
            record.update(study.prune_config(model, config, calibration, args))
            t = time.perf_counter()
            result = run_downstream(
                model,
                tokenizer,
                args.tasks,
                limit=args.limit,
                batch_size=args.task_batch_size,
                task_data=plan,
                keep_documents=True,
                show_progress=args.progress,
                seed=args.seed,
            )
            record["eval_seconds"] = time.perf_counter() - t
            record["tasks"] = result.tasks
            record["samples"] = result.samples
            record["documents"] = {
                task: [int(d["doc_id"]) for d in docs if d.get("acc") == 1.0]
                for task, docs in result.documents.items()
            }
            record["lm_eval_version"] = result.settings["lm_eval_version"]
            record["task_data"] = result.settings.get("task_data")
            pooled = result.tasks.get("xcopa", {})
            print(
                f"[xcopa] {config.name}: pooled acc {pooled.get('acc', math.nan):.3f} "
                f"+- {pooled.get('acc_stderr', math.nan):.3f}; eval {record['eval_seconds']:.0f} s, "
                f"prune {record.get('prune_seconds', 0):.0f} s",
                flush=True,
            )
        except (FloatingPointError, RuntimeError, ValueError) as err:
            record["error"] = f"{type(err).__name__}: {err}"
            print(f"[xcopa] {config.name} failed: {record['error']}", flush=True)
        record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        record["uptime"] = _uptime()
        results[config.name] = record
        study.save_cache(json_path, cache)
        write_report(cache, args, command)  # a partial run is a usable report
    cache["uptime"].append(f"end: {_uptime()}")
    study.save_cache(json_path, cache)
    return cache


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _correct(record: Mapping[str, Any], languages: Sequence[str]) -> dict[str, set[int]]:
    return {lang: set(record.get("documents", {}).get(f"xcopa_{lang}", [])) for lang in languages}


def paired_difference(
    a: Mapping[str, set[int]], b: Mapping[str, set[int]], sizes: Mapping[str, int]
) -> tuple[float, float]:
    """Accuracy of ``a`` minus ``b`` over the pooled items and its paired standard error.

    Per item the difference d is +1, 0 or -1; the standard error of the mean of n differences is
    ``sd(d) / sqrt(n)`` (the same items for both models, so their shared difficulty cancels).
    """
    diffs: list[int] = []
    for lang, n in sizes.items():
        for doc in range(n):
            diffs.append(int(doc in a[lang]) - int(doc in b[lang]))
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n)


def accuracy_table(
    results: Mapping[str, Mapping[str, Any]], order: Sequence[str], languages: Sequence[str]
) -> str:
    header = ["configuration", *languages, "**pooled**"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in order:
        record = results[name]
        if "error" in record:
            lines.append(f"| {name} | failed: {record['error']} |" + " |" * (len(header) - 2))
            continue
        tasks = record["tasks"]
        cells = [
            f"{_f(tasks[f'xcopa_{lang}']['acc'])} ± {_f(tasks[f'xcopa_{lang}'].get('acc_stderr'))}"
            if f"xcopa_{lang}" in tasks
            else "-"
            for lang in languages
        ]
        pooled = tasks.get("xcopa", {})
        cells.append(f"**{_f(pooled.get('acc'))} ± {_f(pooled.get('acc_stderr'))}**")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def dense_verdict(record: Mapping[str, Any], languages: Sequence[str]) -> list[str]:
    tasks = record["tasks"]
    above = []
    lines = ["| language | acc | stderr | (acc - 0.5) / stderr |", "|---|---:|---:|---:|"]
    for name in [*(f"xcopa_{lang}" for lang in languages), "xcopa"]:
        metrics = tasks.get(name)
        if not metrics:
            continue
        acc, se = metrics["acc"], metrics.get("acc_stderr", math.nan)
        z = (acc - CHANCE) / se if se else math.nan
        if name != "xcopa" and z > 2:
            above.append(name.removeprefix("xcopa_"))
        label = "**pooled**" if name == "xcopa" else name.removeprefix("xcopa_")
        lines.append(f"| {label} | {_f(acc)} | {_f(se)} | {_f(z, 1)} |")
    return lines + ["", f"Languages more than 2 standard errors above chance: {', '.join(above) or 'none'}."]


def comparison_lines(
    results: Mapping[str, Mapping[str, Any]], order: Sequence[str], languages: Sequence[str]
):
    """Every pair of pruning methods at one sparsity, and each method against dense: paired differences."""
    ok = {n: r for n, r in results.items() if "error" not in r and "documents" in r}
    sizes = (
        {lang: int(ok[next(iter(ok))]["samples"].get(f"xcopa_{lang}", 0)) for lang in languages} if ok else {}
    )
    pairs = []
    groups: dict[str, list[str]] = {}
    for name in order:
        if name in ok and name != "dense":
            groups.setdefault(name.split("@")[-1] + ("/2:4" if "2:4" in name else ""), []).append(name)
    for names in groups.values():
        if "dense" in ok:
            pairs += [(n, "dense") for n in names]
        pairs += [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    lines = [
        "| A | B | acc A - acc B (pooled) | paired stderr | \\|diff\\| / stderr |",
        "|---|---|---:|---:|---:|",
    ]
    exceeding = []
    for a, b in pairs:
        diff, se = paired_difference(_correct(ok[a], languages), _correct(ok[b], languages), sizes)
        ratio = abs(diff) / se if se else math.nan
        if ratio > 2:
            exceeding.append(f"{a} vs {b}")
        lines.append(f"| {a} | {b} | {diff:+.3f} | {_f(se)} | {_f(ratio, 1)} |")
    return lines, exceeding


def write_report(cache: Mapping[str, Any], args: argparse.Namespace, command: str) -> str:
    key = settings_key(args)
    results = {n: r for n, r in cache.get("results", {}).items() if r.get("settings") == key}
    wanted = [c.name for c in study.expand_config_names(args.configs, [0.5, 0.6])]
    order = [n for n in wanted if n in results] + sorted(n for n in results if n not in wanted)
    missing = [n for n in wanted if n not in results]
    first = next((r for r in results.values() if "tasks" in r), {})
    n = first.get("samples", {}).get("xcopa_et", args.limit)
    lines = [
        "# XCOPA on pruned Gemma 3 270M (lm-evaluation-harness's own tasks, local data)",
        "",
        f"Command: `{command}`",
        "",
        f"- Model: {args.model} (Gemma 3 270M, `optimum_mwanda.demo`). Calibration as in "
        f"`multilingual_study.py`: bundled corpus, {' '.join(args.languages)} x {args.samples_per_language} "
        f"x {args.seq_len} tokens, seed {args.seed}.",
        f"- Task: lm-eval {first.get('lm_eval_version', '?')} `xcopa` group (11 languages, 2-way choice, "
        f"0-shot, chance {CHANCE}), its own prompts and `acc`, on the local validation split "
        f"({n} items per language; lm-eval would score the Hub's test split, which is not stored here) via "
        "`run_downstream(..., task_data=...)`. `±` is lm-eval's standard error (binomial, per language; the "
        "pooled one is lm-eval's group aggregation, items weighted by size).",
        f"- Machine: 2 shared CPU cores (shared with other jobs), {args.threads} torch thread(s), lm-eval "
        f"batch size {args.task_batch_size}. Load: " + "; ".join(cache.get("uptime", [])) + ".",
    ]
    if missing:
        lines.append(f"- **Not finished** (not run before the deadline): {', '.join(missing)}.")
        evals = [r["eval_seconds"] for r in results.values() if "eval_seconds" in r]
        if evals:
            per = evals[-1] / 60  # the latest run's pace: the machine's load changed a lot between runs
            lines.append(
                f"- Extrapolation: the latest evaluation took {per:.0f} min (2,200 log-likelihood "
                f"requests); the {len(missing)} missing configurations need about {len(missing) * per / 60:.1f} h "
                "of evaluation plus their pruning (2-5 min each in `multilingual_study.md`). Resume with the "
                "same command: finished configurations are skipped."
            )
    lines += [
        "",
        "## Accuracy per language (± standard error)",
        "",
        accuracy_table(results, order, args.languages_eval),
    ]
    if "dense" in results and "tasks" in results["dense"]:
        lines += [
            "",
            "## Is the dense model above chance?",
            "",
            *dense_verdict(results["dense"], args.languages_eval),
        ]
    comparison, exceeding = comparison_lines(results, order, args.languages_eval)
    lines += [
        "",
        "## Differences between configurations (pooled over the 11 languages, paired on the same items)",
        "",
        *comparison,
        "",
        "Differences larger than twice their paired standard error: "
        + (", ".join(exceeding) if exceeding else "none")
        + ".",
        "",
        "## Timings",
        "",
        "| configuration | prune s | eval s | finished | load |",
        "|---|---:|---:|---|---|",
    ]
    for name in order:
        r = results[name]
        load = r.get("uptime", "").split("load average:")[-1].strip()
        lines.append(
            f"| {name} | {_f(r.get('prune_seconds'), 0)} | {_f(r.get('eval_seconds'), 0)} | "
            f"{r.get('finished', '-')} | {load} |"
        )
    lines += ["", "What the numbers mean: docs/evaluation.md, section 'XCOPA on Gemma 3 270M'."]
    markdown = "\n".join(lines) + "\n"
    path = args.output.with_suffix(".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, markdown, durable=False)
    return markdown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="multilingual_study.py names")
    parser.add_argument("--languages", nargs="+", default=study.CALIBRATION_LANGUAGES, help="calibration")
    parser.add_argument(
        "--tasks", nargs="+", default=["xcopa"], help="lm-eval tasks (default: the xcopa group)"
    )
    parser.add_argument(
        "--task-data",
        type=Path,
        default=None,
        help="local XCOPA folder (default: ../shared/benchmarks/xcopa)",
    )
    parser.add_argument("--limit", type=int, default=None, help="items per language (default: all)")
    parser.add_argument("--samples-per-language", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward pass")
    parser.add_argument("--task-batch-size", type=int, default=16, help="lm-eval batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="path without suffix")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.languages_eval = XCOPA_LANGUAGES
    configs = study.expand_config_names(args.configs, [0.5, 0.6])
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/xcopa_study.py " + " ".join(shlex.quote(a) for a in argv)
    json_path = args.output.with_suffix(".json")
    if args.report_only:
        cache = study.load_cache(json_path)
    else:
        if args.task_data is None:
            args.task_data = shared_folder("benchmarks", "xcopa")
            if args.task_data is None:
                raise SystemExit("no ../shared/benchmarks/xcopa next to the repository: pass --task-data DIR")
        cache = run(args, configs, json_path, command.strip())
        commands = cache.setdefault("commands", [])
        if command.strip() not in commands:
            commands.append(command.strip())
        study.save_cache(json_path, cache)
    print(write_report(cache, args, " && ".join(cache.get("commands") or [command.strip()])))


if __name__ == "__main__":
    main()
