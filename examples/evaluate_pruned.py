"""Per-language perplexity (and optionally lm-evaluation-harness tasks) of pruned or dense models.

Each MODEL is ``demo`` (the embedded Gemma 3 270M), a local folder (a pruned checkpoint saved by
optimum-mwanda, dense or compressed, or any transformers checkpoint) or a Hub id. Models are evaluated one
after the other on the bundled held-out text (or ``--data``: a folder of ``{lang}.txt`` files, one text per
line) and printed as one table, a column per model, with the measured sparsity of each.

``--tasks`` additionally runs EleutherAI's lm-evaluation-harness (``pip install 'optimum-mwanda[eval]'``)
through ``optimum_mwanda.evaluation.run_downstream``: the bundled offline tasks ``mwanda_continuation``
(next-sentence choice, acc) and ``mwanda_translation`` (3-shot, chrF), one subtask per ``--languages``,
printed as a per-language table; any other lm-eval task or group (``xcopa``, ``xnli_sw``,
``belebele_swh_Latn``) downloads its data from the Hub, or, with ``--task-data DIR``, runs lm-eval's own task
definitions on local copies of the data (layout: docs/evaluation.md). Every number is printed with lm-eval's
standard error. When lm-eval is not installed and tasks are requested, or a task's local data is missing,
the script says so and exits with status 2 before loading any model.

Usage::

    python examples/evaluate_pruned.py demo gemma-3-270m-mwanda-50
    python examples/evaluate_pruned.py gemma-3-270m-mwanda-50 --languages en sw de --json ppl.json
    python examples/evaluate_pruned.py demo gemma-3-270m-mwanda-50 --tasks mwanda_continuation,mwanda_translation --task-limit 10
    python examples/evaluate_pruned.py gemma-3-270m-mwanda-50 --tasks xnli_sw,xstorycloze_sw --task-limit 200  # online
    python examples/evaluate_pruned.py demo gemma-3-270m-mwanda-50 --tasks xcopa --task-data ../shared/benchmarks/xcopa
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optimum_mwanda.cli.arguments import ExampleHelpFormatter, add_language_list
from optimum_mwanda.evaluation.summary import format_perplexity_table, geometric_mean  # noqa: F401

DEFAULT_LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]
LM_EVAL_MISSING = (
    "lm-evaluation-harness is not installed, so --tasks cannot run: pip install 'optimum-mwanda[eval]' "
    "(lm-eval and sacrebleu)"
)


def lm_eval_available() -> bool:
    """Whether the optional ``lm_eval`` (and ``sacrebleu``) packages can be imported."""
    return (
        importlib.util.find_spec("lm_eval") is not None and importlib.util.find_spec("sacrebleu") is not None
    )


def parse_tasks(spec: str | None) -> list[str]:
    """``"xnli, xstorycloze"`` -> ``["xnli", "xstorycloze"]`` (empty names dropped, order kept, no repeats)."""
    if not spec:
        return []
    return list(dict.fromkeys(task.strip() for task in spec.split(",") if task.strip()))


def format_table(
    columns: Mapping[str, Mapping[str, float]],
    languages: Sequence[str],
    sparsity: Mapping[str, float] | None = None,
) -> str:
    """Perplexity per language (rows) and model (columns), their geometric mean and the models' sparsity."""
    return format_perplexity_table(
        columns, languages, {"sparsity": sparsity} if sparsity is not None else None
    )


def flatten_lm_eval_results(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``simple_evaluate``'s ``results["results"]`` as ``{task: {metric: value}}``.

    The harness keys metrics as ``"<metric>,<filter>"`` (``"acc,none"``, ``"acc_stderr,none"``); the default
    ``none`` filter is dropped from the name, non-numeric entries (aliases) are skipped.
    """
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        row = {}
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filter_name = key.partition(",")
            row[metric if filter_name in ("", "none") else f"{metric} ({filter_name})"] = float(value)
        if row:
            flat[task] = row
    return flat


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    batch_size: int,
    limit: int | None,
    num_fewshot: int | None,
    languages: Sequence[str] | None = None,
    task_data=None,
):
    """Run lm-evaluation-harness tasks on an in-memory model (``HFLM(pretrained=model)``): a
    ``DownstreamResult`` with per-task metrics and standard errors and the per-language table of the
    bundled tasks. ``task_data``: local data for lm-eval's own tasks (folders, or a plan from
    ``prepare_task_data``)."""
    from optimum_mwanda.evaluation import run_downstream

    return run_downstream(
        model,
        tokenizer,
        tasks,
        languages=languages,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        task_data=task_data,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ExampleHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="'demo', a folder or a Hub id")
    add_language_list(
        parser,
        "--languages",
        help="languages, comma- or space-separated (None: ar de en es ru sw zh, or every language of --data)",
    )
    parser.add_argument("--data", type=Path, help="a folder of {lang}.txt files to evaluate on instead")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--stride", type=int, default=None, help="sliding-window stride (None: no overlap)")
    parser.add_argument("--max-windows", type=int, default=4, help="windows per language (0: all)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="parameter dtype"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's)")
    harness = parser.add_argument_group(
        "lm-evaluation-harness (optional: pip install 'optimum-mwanda[eval]')"
    )
    harness.add_argument(
        "--tasks",
        "--lm-eval-tasks",
        dest="lm_eval_tasks",
        default=None,
        help="comma-separated tasks: mwanda_continuation, mwanda_translation (offline, per --languages) "
        "or any lm-eval task name (online), e.g. xnli_sw",
    )
    harness.add_argument(
        "--task-limit",
        "--lm-eval-limit",
        dest="lm_eval_limit",
        type=int,
        default=None,
        help="documents per task",
    )
    harness.add_argument("--lm-eval-fewshot", type=int, default=None, help="few-shot examples")
    harness.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval batch size")
    harness.add_argument(
        "--task-data",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="local data for lm-eval's own tasks (e.g. ../shared/benchmarks/xcopa for --tasks xcopa)",
    )
    return parser


def _load(reference: str, dtype):
    from transformers import AutoTokenizer

    if reference == "demo":
        from optimum_mwanda.demo import load_demo_model

        return load_demo_model(dtype=dtype)
    from optimum_mwanda import load_pruned_model

    if not Path(reference).exists():
        from optimum_mwanda.hub.connectivity import HubUnreachableError, check_hub_model_reachable

        try:  # a hint within seconds instead of a minute of retries when offline
            check_hub_model_reachable(reference)
        except HubUnreachableError as err:
            raise SystemExit(f"{reference}: {err}") from None
    # load_pruned_model reads dense and compressed optimum-mwanda checkpoints and plain ones alike.
    model = load_pruned_model(reference, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(reference)


def _texts(args: argparse.Namespace) -> dict[str, list[str]]:
    from optimum_mwanda.calibration import load_bundled_corpus, load_local_texts

    if args.data is None:
        try:
            return load_bundled_corpus("heldout", args.languages or DEFAULT_LANGUAGES)
        except ValueError as err:  # an unknown or malformed language: say so before any model loads
            raise SystemExit(f"--languages: {err}") from None
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data} is not a folder of {{lang}}.txt files")
    texts = load_local_texts(args.data, languages=args.languages)
    if not texts:
        raise SystemExit(f"--data {args.data}: no texts found for languages {args.languages}")
    return texts


def _unique_labels(references: Sequence[str]) -> list[str]:
    """Short column labels (folder or repo names), made unique."""
    labels: list[str] = []
    for reference in references:
        label = Path(reference.rstrip("/")).name or reference
        candidate, n = label, 2
        while candidate in labels:
            candidate, n = f"{label}#{n}", n + 1
        labels.append(candidate)
    return labels


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    tasks = parse_tasks(args.lm_eval_tasks)
    if tasks and not lm_eval_available():
        print(f"error: {LM_EVAL_MISSING}", file=sys.stderr)
        raise SystemExit(2)
    if args.max_windows < 0 or args.seq_len < 2 or args.batch_size < 1:
        raise SystemExit("--max-windows must be >= 0, --seq-len >= 2 and --batch-size >= 1")
    plan = None
    if args.task_data:
        if not tasks:
            raise SystemExit("--task-data needs --tasks")
        from optimum_mwanda.evaluation import prepare_task_data

        try:  # every task's files found before any model is loaded
            plan = prepare_task_data(tasks, args.task_data, num_fewshot=args.lm_eval_fewshot)
        except (OSError, ValueError) as err:
            print(f"error: --task-data: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    import torch

    from optimum_mwanda import evaluate_perplexity, verify_sparsity

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = _texts(args)
    languages = list(texts)
    dtype = getattr(torch, args.dtype)

    columns: dict[str, dict[str, float]] = {}
    sparsity: dict[str, float] = {}
    details: dict[str, Any] = {}
    tables: dict[str, str] = {}
    for reference, label in zip(args.models, _unique_labels(args.models)):
        print(f"evaluating {reference} ...", flush=True)
        start = time.perf_counter()
        model, tokenizer = _load(reference, dtype)
        result = evaluate_perplexity(
            model,
            tokenizer,
            texts,
            seq_len=args.seq_len,
            stride=args.stride,
            batch_size=args.batch_size,
            max_windows=args.max_windows or None,
            return_details=True,
        )
        columns[label] = result.perplexities
        try:
            sparsity[label] = verify_sparsity(model).overall
        except ValueError:  # no decoder layers found: report perplexity only
            sparsity[label] = math.nan
        entry: dict[str, Any] = {
            "model": reference,
            "perplexity": result.perplexities,
            "scored_tokens": result.tokens,
            "sparsity": None if math.isnan(sparsity[label]) else sparsity[label],
        }
        if tasks:
            downstream = run_lm_eval(
                model,
                tokenizer,
                tasks,
                args.lm_eval_batch_size,
                args.lm_eval_limit,
                args.lm_eval_fewshot,
                languages=languages,
                task_data=plan,
            )
            entry["lm_eval"] = downstream.tasks
            entry["downstream"] = downstream.to_dict()
            tables[label] = downstream.format_table()
        entry["seconds"] = time.perf_counter() - start
        details[label] = entry
        del model  # one model in memory at a time

    print()
    window = f"{args.max_windows} windows" if args.max_windows else "all windows"
    print(f"Held-out perplexity ({window} of {args.seq_len} tokens per language):")
    print(format_table(columns, languages, sparsity))
    for label, table in tables.items():
        print(f"\nDownstream tasks (lm-evaluation-harness), {label}:")
        print(table)

    output = {
        "settings": {
            "languages": languages,
            "data": str(args.data) if args.data else "bundled heldout",
            "seq_len": args.seq_len,
            "stride": args.stride,
            "max_windows": args.max_windows,
            "dtype": args.dtype,
            "lm_eval_tasks": tasks,
            "lm_eval_limit": args.lm_eval_limit,
        },
        "models": details,
    }
    if args.json:
        args.json.write_text(json.dumps(output, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return output


if __name__ == "__main__":
    main(sys.argv[1:])
