"""Downstream accuracy and chrF of Gemma 3 270M pruned by Wanda, SparseGPT and M-Wanda (the offline tasks).

A sibling of ``multilingual_study.py``: the same configuration names, the same calibration (the bundled
corpus, ``--samples-per-language`` x ``--seq-len`` tokens per language, the same seed), the same reload of
the dense weights before each configuration; instead of perplexity, each pruned model runs the bundled
lm-evaluation-harness tasks through :func:`optimum_mwanda.evaluation.run_downstream`:

- ``mwanda_continuation_<lang>`` for ``--languages`` (4-way next-sentence choice on held-out text; acc and
  acc_norm, chance 0.25), the first ``--mc-limit`` documents each;
- ``mwanda_translation_en-<lang>`` (and ``<lang>-en`` with ``--directions both``) for
  ``--translation-languages`` (3-shot, greedy, chrF), the first ``--mt-limit`` documents each.

Every finished configuration is saved at once (atomically) to the JSON and the markdown report is rewritten,
so a partial run is usable; a rerun with the same settings skips what is done. Held-out perplexities of the
same configurations are quoted from ``multilingual_study.json`` when its settings match.

Usage (the committed results came from the command recorded in the markdown)::

    nice -n 5 python benchmarks/downstream_study.py
    python benchmarks/downstream_study.py --report-only
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

DEFAULT_OUTPUT = study.RESULTS / "downstream_study"
# Priority order (a partial run answers the main question first): M-Wanda vs Wanda at 50%, then SparseGPT,
# then 60%, then 2:4.
ORDERED_BASES = ("wanda", "mwanda", "sparsegpt")
DEFAULT_CONFIGS = [
    "dense",
    *[f"{base}@{p}" for p in (50, 60) for base in ORDERED_BASES],
    *[f"{base}[mask_structure=2:4]@50" for base in ORDERED_BASES],
]
TRANSLATION_LANGUAGES = ["ar", "de", "es", "ru", "zh"]
CHANCE = 0.25


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def settings_key(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "languages": list(args.languages),
        "translation_languages": list(args.translation_languages),
        "directions": args.directions,
        "mc_limit": args.mc_limit,
        "mt_limit": args.mt_limit,
        "samples_per_language": args.samples_per_language,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }


def _translation_family(directions: str) -> str:
    return {"en-xx": "mwanda_translation_en_xx", "xx-en": "mwanda_translation_xx_en"}.get(
        directions, "mwanda_translation"
    )


def run(
    args: argparse.Namespace, configs: Sequence[study.StudyConfig], json_path: Path, command: str
) -> dict:
    import torch

    from optimum_mwanda.evaluation.harness import run_downstream

    torch.set_num_threads(args.threads)
    cache = study.load_cache(json_path)
    key = settings_key(args)
    results = cache.setdefault("results", {})
    todo = [
        c for c in configs if results.get(c.name, {}).get("settings") != key or "error" in results[c.name]
    ]
    if not todo:
        return cache
    cache.setdefault("uptime", []).append(f"start: {_uptime()}")
    model, tokenizer = study.load_model(args.model)
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calibration = study.study_calibration(tokenizer, args)
    for i, config in enumerate(todo, 1):
        print(f"[downstream] ({i}/{len(todo)}) {config.name}  {_uptime()}", flush=True)
        model.load_state_dict(dense_state)
        record: dict[str, Any] = {"settings": key, "method": config.method, "sparsity": config.sparsity}
        try:
            record.update(study.prune_config(model, config, calibration, args))
            t = time.perf_counter()
            mc = run_downstream(
                model,
                tokenizer,
                "mwanda_continuation",
                languages=args.languages,
                limit=args.mc_limit,
                batch_size=args.task_batch_size,
                show_progress=args.progress,
            )
            record["mc_seconds"] = time.perf_counter() - t
            t = time.perf_counter()
            mt = run_downstream(
                model,
                tokenizer,
                _translation_family(args.directions),
                languages=args.translation_languages,
                limit=args.mt_limit,
                batch_size=args.task_batch_size,
                show_progress=args.progress,
            )
            record["mt_seconds"] = time.perf_counter() - t
            record["tasks"] = {**mc.tasks, **mt.tasks}
            record["samples"] = {**mc.samples, **mt.samples}
            record["lm_eval_version"] = mc.settings["lm_eval_version"]
            means = {**mc.means(), **mt.means()}
            print(
                f"[downstream] {config.name}: "
                + ", ".join(f"{k} {v:.3f}" for k, v in means.items())
                + f"; mc {record['mc_seconds']:.0f} s, mt {record['mt_seconds']:.0f} s",
                flush=True,
            )
        except (FloatingPointError, RuntimeError, ValueError) as err:
            record["error"] = f"{type(err).__name__}: {err}"
            print(f"[downstream] {config.name} failed: {record['error']}", flush=True)
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
def per_language(record: Mapping[str, Any]):
    from optimum_mwanda.evaluation.harness import DownstreamResult

    return DownstreamResult(dict(record.get("tasks", {})), dict(record.get("samples", {})))


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def metric_table(
    results: Mapping[str, Mapping[str, Any]], order: Sequence[str], languages: Sequence[str], column: str
) -> str:
    digits = 1 if column.startswith("chrf") else 3
    header = ["configuration", *languages, "**mean**"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name in order:
        record = results[name]
        if "error" in record:
            lines.append(f"| {name} | failed: {record['error']} |" + " |" * (len(header) - 2))
            continue
        table = per_language(record).by_language
        values = [table.get(lang, {}).get(column) for lang in languages]
        row = [name, *(_f(v, digits) for v in values), f"**{_f(_mean(values), digits)}**"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def summary_table(
    results: Mapping[str, Mapping[str, Any]],
    order: Sequence[str],
    args: argparse.Namespace,
    perplexity: Mapping[str, float],
) -> str:
    columns = ["continuation_acc", "continuation_acc_norm"]
    columns += {"en-xx": ["chrf_en_xx"], "xx-en": ["chrf_xx_en"]}.get(
        args.directions, ["chrf_en_xx", "chrf_xx_en"]
    )
    header = (
        "| configuration | held-out ppl (geomean) | "
        + " | ".join(f"mean {c}" for c in columns)
        + " | prune s |"
    )
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    for name in order:
        record = results[name]
        if "error" in record:
            continue
        table = per_language(record).by_language
        langs = {
            c: args.languages if c.startswith("continuation") else args.translation_languages for c in columns
        }
        means = [_mean([table.get(lang, {}).get(c, math.nan) for lang in langs[c]]) for c in columns]
        row = [
            name,
            _f(perplexity.get(name), 1),
            *(_f(m, 1 if c.startswith("chrf") else 3) for m, c in zip(means, columns)),
            _f(record.get("prune_seconds"), 0),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _study_perplexities(args: argparse.Namespace) -> dict[str, float]:
    """Geometric-mean held-out perplexity per configuration from multilingual_study.json, when the
    calibration settings are the same (otherwise nothing: a different pruned model)."""
    path = study.DEFAULT_OUTPUT.with_suffix(".json")
    if not path.is_file():
        return {}
    cache = study.load_cache(path)
    out = {}
    for name, record in cache.get("results", {}).items():
        s = record.get("settings", {})
        same_model = s.get("model") == args.model and s.get("languages") == list(args.languages)
        same_calibration = (
            s.get("samples_per_language") == args.samples_per_language
            and s.get("seq_len") == args.seq_len
            and s.get("seed") == args.seed
        )
        # The dense model does not depend on the calibration settings.
        if same_model and (name == "dense" or same_calibration) and "geomean" in record:
            out[name] = record["geomean"]
    return out


def write_report(cache: Mapping[str, Any], args: argparse.Namespace, command: str) -> str:
    key = settings_key(args)
    results = {n: r for n, r in cache.get("results", {}).items() if r.get("settings") == key}
    wanted = [c.name for c in study.expand_config_names(args.configs, [0.5, 0.6])]
    order = [n for n in wanted if n in results] + sorted(n for n in results if n not in wanted)
    directions = {"en-xx": ["chrf_en_xx"], "xx-en": ["chrf_xx_en"]}.get(
        args.directions, ["chrf_en_xx", "chrf_xx_en"]
    )
    first = next(iter(results.values()), {})
    n_mc = first.get("samples", {}).get(f"mwanda_continuation_{args.languages[0]}", args.mc_limit)
    n_mt = next(
        (v for k, v in first.get("samples", {}).items() if k.startswith("mwanda_translation")), args.mt_limit
    )
    lines = [
        "# Downstream study: offline lm-eval tasks on pruned Gemma 3 270M",
        "",
        f"Command: `{command}`",
        "",
        f"- Model: {args.model} (Gemma 3 270M, Q4_K_M GGUF dequantized to float32). Calibration as in "
        f"`multilingual_study.py`: bundled corpus, {len(args.languages)} languages x {args.samples_per_language} "
        f"x {args.seq_len} tokens, seed {args.seed}.",
        f"- Tasks (lm-eval {first.get('lm_eval_version', '?')}, `simple_evaluate` + `HFLM`): "
        f"`mwanda_continuation_<lang>` for {', '.join(args.languages)}, the first {n_mc} documents each "
        f"(4-way, chance {CHANCE}); translation ({args.directions}) for {', '.join(args.translation_languages)}, "
        f"3-shot greedy, the first {n_mt} sentences each, chrF (sacrebleu).",
        f"- Standard error of one language's accuracy near chance with n = {n_mc}: about "
        f"{math.sqrt(CHANCE * (1 - CHANCE) / max(1, n_mc)):.3f}; of the {len(args.languages)}-language mean: about "
        f"{math.sqrt(CHANCE * (1 - CHANCE) / max(1, n_mc * len(args.languages))):.3f}.",
        f"- Machine: 2 shared CPU cores, {args.threads} torch thread(s). Load: "
        + "; ".join(cache.get("uptime", []))
        + ".",
        "",
        "## Summary (means over languages)",
        "",
        summary_table(results, order, args, _study_perplexities(args)),
        "",
        "Held-out perplexity: from `multilingual_study.json` (same calibration settings), where measured.",
        "",
        "## Next-sentence choice: accuracy per language",
        "",
        metric_table(results, order, args.languages, "continuation_acc"),
        "",
        "## Next-sentence choice: length-normalised accuracy (acc_norm) per language",
        "",
        metric_table(results, order, args.languages, "continuation_acc_norm"),
    ]
    for column in directions:
        title = "English -> language" if column == "chrf_en_xx" else "language -> English"
        lines += ["", f"## Translation {title}: chrF per language", ""]
        lines.append(metric_table(results, order, args.translation_languages, column))
    lines += [
        "",
        "## Reading",
        "",
        "What the tables do and do not show: docs/evaluation.md, section 'Downstream study on Gemma 3 270M'.",
    ]
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
    parser.add_argument("--languages", nargs="+", default=study.CALIBRATION_LANGUAGES)
    parser.add_argument("--translation-languages", nargs="+", default=TRANSLATION_LANGUAGES)
    parser.add_argument("--directions", choices=["en-xx", "xx-en", "both"], default="both")
    parser.add_argument("--mc-limit", type=int, default=30, help="continuation documents per language")
    parser.add_argument("--mt-limit", type=int, default=25, help="translation sentences per direction")
    parser.add_argument("--samples-per-language", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="calibration sequences per forward pass")
    parser.add_argument("--task-batch-size", type=int, default=4, help="lm-eval batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="path without suffix")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configs = study.expand_config_names(args.configs, [0.5, 0.6])
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/downstream_study.py " + " ".join(shlex.quote(a) for a in argv)
    json_path = args.output.with_suffix(".json")
    if args.report_only:
        cache = study.load_cache(json_path)
    else:
        cache = run(args, configs, json_path, command.strip())
        commands = cache.setdefault("commands", [])
        if command.strip() not in commands:
            commands.append(command.strip())
        study.save_cache(json_path, cache)
    print(write_report(cache, args, " && ".join(cache.get("commands") or [command.strip()])))


if __name__ == "__main__":
    main()
