"""Fast screening of M-Wanda importance formulations on Gemma 3 270M.

The real pruner is sequential (each layer's statistics come from the already-pruned earlier layers), so
comparing N formulations costs N full prunes. For *screening* this script collects per-language
statistics of every linear module once, on the dense model, then builds each variant's masks from those
statistics and measures held-out perplexity. Variants that win here are then confirmed with the real
sequential pruner in ``benchmarks/multilingual_study.py``; only those numbers decide the defaults.

Usage: ``python research/mwanda_screening.py`` (writes ``research/results/mwanda_screening.{json,md}``).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import screening
import torch

from optimum_mwanda.modeling import LayerStatisticsCollector
from optimum_mwanda.parts import (
    FeatureStatistics,
    cross_lingual_correlation,
    cwl_schedule,
    mask_from_scores,
    outlier_ratio,
    owl_schedule,
    wanda_scores,
)

THRESHOLDS = (1.0, 2.0, 3.0)


def collect_dense_statistics(model, calibration, batch_size: int = 4):
    """Per-language statistics of every prunable module's input, from one dense forward pass."""
    modules = screening.prunable_modules(model)
    n_lang = len(calibration.language_list)
    collectors = {
        t: LayerStatisticsCollector(
            modules,
            lambda n, device, t=t: FeatureStatistics(
                n, n_lang, device, track_activation=True, activation_threshold=t
            ),
        )
        for t in THRESHOLDS
    }
    screening.forward_calibration(
        model, calibration, collectors.values(), calibration.language_index, batch_size
    )
    stats = {t: {m.name: c.statistic_for(m) for m in modules} for t, c in collectors.items()}
    return modules, stats


def generalized_mean(norms: torch.Tensor, p: float) -> torch.Tensor:
    if math.isinf(p):
        return norms.amax(0)
    return norms.pow(p).mean(0).pow(1.0 / p)


def variants() -> dict[str, Callable]:
    """name -> importance(stats_by_threshold, module_name) -> [in]"""

    def wanda(s, n):
        return s[1.0][n].pooled_norm

    def variance(w, t=1.0):
        return lambda s, n: s[t][n].pooled_norm + w * s[t][n].language_norms.std(0, unbiased=False)

    def prob(w, t):
        return lambda s, n: s[t][n].pooled_norm * (1 + w * s[t][n].activation_probability.amax(0))

    def prob_mean(w, t):
        return lambda s, n: s[t][n].pooled_norm * (1 + w * s[t][n].activation_probability.mean(0))

    def pmean(p):
        return lambda s, n: generalized_mean(s[1.0][n].language_norms, p)

    def balanced(s, n):
        norms = s[1.0][n].language_norms
        scale = norms.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        return (norms / scale).pow(2).mean(0).sqrt()

    def minimum(s, n):
        return s[1.0][n].language_norms.amin(0)

    def ria(power, per_language=None):
        # RIA-style relative importance (Zhang et al., 2024): |W| relative to its row and column sums,
        # times the activation norm to a power; optionally the norm is a per-language generalised mean.
        def score(s, n, weight):
            w = weight.abs().float()
            relative = w / w.sum(1, keepdim=True).clamp_min(1e-12) + w / w.sum(0, keepdim=True).clamp_min(
                1e-12
            )
            norm = (
                s[1.0][n].pooled_norm
                if per_language is None
                else generalized_mean(s[1.0][n].language_norms, per_language)
            )
            return relative * norm.pow(power).unsqueeze(0)

        score.needs_weight = True
        return score

    def wanda_power(power):
        return lambda s, n: s[1.0][n].pooled_norm.pow(power)

    return {
        "wanda": wanda,
        "variance w=0.25": variance(0.25),
        "variance w=0.5": variance(0.5),
        "variance w=1": variance(1.0),
        "variance w=2": variance(2.0),
        "variance w=-0.25": variance(-0.25),
        "p-mean p=4": pmean(4.0),
        "p-mean p=8": pmean(8.0),
        "p-mean p=inf (max)": pmean(math.inf),
        "p-mean p=1": pmean(1.0),
        "min over languages": minimum,
        "language-balanced": balanced,
        "max-prob w=0.25 t=1": prob(0.25, 1.0),
        "max-prob w=1 t=1": prob(1.0, 1.0),
        "max-prob w=0.25 t=2": prob(0.25, 2.0),
        "max-prob w=0.5 t=3": prob(0.5, 3.0),
        "mean-prob w=0.5 t=2": prob_mean(0.5, 2.0),
        "max-prob w=1 t=3": prob(1.0, 3.0),
        "max-prob w=2 t=3": prob(2.0, 3.0),
        "RIA a=0.5": ria(0.5),
        "RIA a=1": ria(1.0),
        "RIA a=0.5 p-mean p=4": ria(0.5, 4.0),
        "norm^0.5": wanda_power(0.5),
        "norm^1.5": wanda_power(1.5),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, default=0.5)
    screening.add_screening_arguments(parser, threads=1)
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument(
        "--cwl", action="store_true", help="also screen CWL layer schedules with the Wanda score"
    )
    parser.add_argument("--output", type=Path, default=screening.RESULTS / "mwanda_screening")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = screening.load_screening_data(args.samples_per_language)
    t = time.perf_counter()
    modules, stats = collect_dense_statistics(data.model, data.calibration)
    print(f"[screening] dense statistics in {time.perf_counter() - t:.0f} s", flush=True)
    originals = {m.name: m.read_weight().clone() for m in modules}
    layer_of = {m.name: int(m.name.split(".")[-3]) for m in modules}
    n_layers = max(layer_of.values()) + 1

    def run(name, importance, layer_sparsity=None):
        for m in modules:
            weight = originals[m.name]
            sparsity = layer_sparsity[layer_of[m.name]] if layer_sparsity else args.sparsity
            value = importance(stats, m.name) if not getattr(importance, "needs_weight", False) else None
            scores = wanda_scores(weight, value) if value is not None else importance(stats, m.name, weight)
            mask = mask_from_scores(scores, sparsity, None)
            m.write_weight(weight.masked_fill(mask, 0.0))
        ppl, geo = screening.score_and_restore(data, modules, originals, args.max_windows)
        print(
            f"[screening] {name:28s} geomean {geo:8.2f}  " + " ".join(f"{k}={v:.1f}" for k, v in ppl.items()),
            flush=True,
        )
        return {"perplexity": ppl, "geomean": geo}

    results = screening.load_results(args.output)
    todo = {k: v for k, v in variants().items() if not args.only or k in args.only}
    if "dense" not in results:
        # Nothing is written yet: "restoring" the dense weights leaves the model as it is.
        ppl, geo = screening.score_and_restore(data, modules, originals, args.max_windows)
        results["dense"] = {"perplexity": ppl, "geomean": geo}
    for name, importance in todo.items():
        if name not in results:
            results[name] = run(name, importance)
            _write(args, results)
    if args.cwl:
        corr = []
        for layer in range(n_layers):
            names = [m.name for m in modules if layer_of[m.name] == layer]
            profiles = torch.cat([stats[1.0][n].language_norms for n in names], dim=1)
            corr.append(cross_lingual_correlation(profiles))
        counts = [sum(originals[n].numel() for n in originals if layer_of[n] == i) for i in range(n_layers)]
        name = "wanda + OWL"
        if name not in results:
            ratios = []
            for layer in range(n_layers):
                names = [m.name for m in modules if layer_of[m.name] == layer]
                scores = [wanda_scores(originals[n], stats[1.0][n].pooled_norm) for n in names]
                ratios.append(outlier_ratio(scores, 5.0))
            schedule = owl_schedule(ratios, counts, args.sparsity, 0.08)
            results[name] = run(name, variants()["wanda"], schedule)
            results[name]["schedule"] = schedule
            _write(args, results)
        for protect in ("specific", "shared"):
            name = f"wanda + CWL {protect}"
            if name not in results:
                schedule = cwl_schedule(corr, counts, args.sparsity, 0.08, protect)
                results[name] = run(name, variants()["wanda"], schedule)
                results[name]["schedule"] = schedule
                results[name]["correlation"] = corr
                _write(args, results)
    _write(args, results)


def _write(args, results) -> None:
    command = "python research/mwanda_screening.py" + (" --cwl" if args.cwl else "")
    record = {"command": command, "settings": vars(args) | {"output": str(args.output)}, "results": results}
    wanda = results.get("wanda", {}).get("geomean")
    lines = [
        "# M-Wanda screening (dense statistics, one-shot masks)",
        "",
        f"Command: `{command}`. Calibration: 7 languages x {args.samples_per_language} x 512 tokens of the bundled "
        f"corpus; held-out: {args.max_windows} windows of 512 tokens per language; sparsity {args.sparsity}.",
        "Statistics from the dense model (not sequential): a screen, not the final numbers.",
        "",
        *screening.table_head([("variant", "---"), ("geomean", "---:"), ("vs Wanda", "---:")]),
    ]
    for name, res in results.items():
        rel = f"{res['geomean'] / wanda:.3f}" if wanda else "-"
        lines.append(screening.table_row([name, f"{res['geomean']:.2f}", rel], res))
    screening.write_results(args.output, record, lines)


if __name__ == "__main__":
    main()
