"""Prune time of Wanda, SparseGPT and M-Wanda as ratios to a plain forward pass, plus peak RSS.

Every measurement runs in its own Python process (fresh peak-RSS counter, no warm caches shared between
methods) on the same model and the same calibration tokens:

- the floor: one plain forward pass of the decoder over the calibration data (``model.get_decoder()``, no
  LM head), in batches of ``--batch-size``: the least work any calibration-based pruner must do. Each
  process measures it right before its own run, so every ratio compares timings taken under the same load;
- ``floor_with_logits``: the same through the full model (LM head and logits included), for reference;
- one run of ``Pruner.prune_model`` per method; a run may set config fields in brackets, as in
  ``multilingual_study.py``: ``--runs wanda mwanda 'mwanda[hessian_token_stride=4]'``, and
  ``prune_model`` options after ``+``: ``'mwanda+statistics_dtype=float32+offload_statistics=true'``.

Usage (Gemma 3 270M, bundled corpus, 7 x 8 x 512 tokens; the committed results came from these, with
``--output benchmarks/results/prune_speed_50`` / ``_70`` / ``_2of4``)::

    python benchmarks/prune_speed.py --runs wanda mwanda --repeats 3
    python benchmarks/prune_speed.py --runs wanda mwanda --repeats 3 --sparsity 0.7
    python benchmarks/prune_speed.py --runs wanda mwanda --repeats 3 --mask-structure 2:4

Writes ``OUTPUT.json`` and ``OUTPUT.md`` (default ``benchmarks/results/prune_speed``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]
RESULTS = Path(__file__).parent / "results"


def _load(args):
    import torch

    from optimum_mwanda.calibration import default_calibration

    if args.model == "demo":
        from optimum_mwanda.demo import load_demo_model

        model, tokenizer = load_demo_model(dtype=torch.float32)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    model.eval()
    calibration = default_calibration(
        tokenizer,
        languages=args.languages,
        samples_per_language=args.samples_per_language,
        seq_len=args.seq_len,
    )
    return model, calibration


def forward_seconds(runner, input_ids, attention_mask, batch_size: int) -> float:
    """Seconds of one plain forward pass of ``runner`` (e.g. ``model.get_decoder()``) over the token ids.

    Needs only torch, so benchmarks/peer_llmcompressor.py measures the same floor with it inside
    llm-compressor's own virtualenv.
    """
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(input_ids), batch_size):
            runner(
                input_ids=input_ids[i : i + batch_size],
                attention_mask=attention_mask[i : i + batch_size],
                use_cache=False,
            )
    return time.perf_counter() - start


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux ``/proc/self/clear_refs`` "5"), so that :func:`peak_rss_mb`
    measures what comes after (pruning) rather than model loading; ``False`` where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak RSS since :func:`reset_peak_rss` (``VmHWM``), in MB; ``None`` without ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def split_run_options(name: str) -> tuple[str, dict]:
    """``"mwanda+statistics_dtype=float32+offload_statistics=true"`` -> the config name and the
    ``Pruner.prune_model`` keyword arguments after each ``+`` (``true``/``false``, numbers, or strings)."""
    config_name, *parts = name.split("+")
    options: dict = {}
    for part in parts:
        key, sep, text = part.partition("=")
        if not sep or not key:
            raise ValueError(f"run option {part!r} is not key=value")
        lowered = text.lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
        else:
            try:
                options[key] = int(text)
            except ValueError:
                options[key] = text
    return config_name, options


def _config(name: str, args):
    """The config of run ``name``: a method (``wanda``, ``sparsegpt``, ``mwanda``), optionally with config
    fields in brackets as in benchmarks/multilingual_study.py, e.g. ``mwanda[hessian_token_stride=4]``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from multilingual_study import parse_config_name

    sparsity = args.sparsity
    if args.mask_structure:
        # N:M: the sparsity follows from the structure (every method's config checks that they agree). The
        # structure goes into the name's options, so that the name is checked as the N:M config it is (a
        # sweep-only field such as refinement_steps is refused on a 50% unstructured M-Wanda).
        n, m = (int(v) for v in args.mask_structure.split(":"))
        sparsity = 1 - n / m
        name = with_option(name, f"mask_structure={args.mask_structure}")
    study = parse_config_name(f"{name}@{sparsity * 100:g}")  # ValueError for "dense" and unknown names
    common = {"batch_size": args.batch_size}
    return study.pruning_config(**{k: v for k, v in common.items() if k not in dict(study.options)})


def with_option(name: str, option: str) -> str:
    """``"mwanda[refinement_steps=3]"`` plus ``"mask_structure=2:4"`` -> ``"mwanda[refinement_steps=3,
    mask_structure=2:4]"`` (a name without brackets gets them). An option the name already sets wins."""
    key = option.partition("=")[0]
    base, bracket, rest = name.partition("[")
    if not bracket:
        return f"{name}[{option}]"
    given = rest.rstrip("]")
    if any(item.partition("=")[0].strip() == key for item in given.split(",")):
        return name
    return f"{base}[{given},{option}]" if given else f"{base}[{option}]"


def worker(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, calibration = _load(args)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result: dict = {"name": name, "tokens": int(calibration.attention_mask.sum())}

    def forward_pass(runner) -> float:
        return forward_seconds(runner, calibration.input_ids, calibration.attention_mask, args.batch_size)

    # Every process measures its own floor right before its run: the ratio then compares two timings
    # taken under the same machine load.
    result["floor_seconds"] = forward_pass(model.get_decoder())
    if name == "floor_with_logits":
        result["seconds"] = forward_pass(model)
    else:
        from optimum_mwanda import Pruner

        config_name, options = split_run_options(name)
        config = _config(config_name, args)
        start = time.perf_counter()
        report = Pruner(config).prune_model(model, calibration, show_progress=False, **options)
        result["seconds"] = time.perf_counter() - start
        result["timings"] = report.timings
        result["achieved_sparsity"] = report.achieved_sparsity
        result["config"] = config.to_dict()
    result["ratio_to_floor"] = result["seconds"] / result["floor_seconds"]
    # Other processes on the machine inflate both timings; the load average says how busy it was.
    result["load_average_1min"] = os.getloadavg()[0]
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rss_after_load_mb"] = rss_loaded
    result["model_parameters"] = sum(p.numel() for p in model.parameters())
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median seconds (the lower middle one for an even count), with every run's
    ``seconds``, ``ratio_to_floor`` and phase ``timings`` added as ``all_seconds`` / ``all_ratio_to_floor``
    / ``all_timings``."""
    if not runs:
        raise ValueError("no runs to summarise")
    ordered = sorted(runs, key=lambda run: run["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_seconds"] = [run["seconds"] for run in runs]
    chosen["all_ratio_to_floor"] = [run["ratio_to_floor"] for run in runs]
    chosen["all_timings"] = [run.get("timings", {}) for run in runs]
    return chosen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="demo", help="'demo' (Gemma 3 270M from its PyPI package) or a path/id"
    )
    parser.add_argument("--languages", nargs="+", default=DEFAULT_LANGUAGES)
    parser.add_argument("--samples-per-language", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument(
        "--mask-structure", default=None, help="e.g. 2:4 (overrides --sparsity; default: unstructured)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=["floor_with_logits", "wanda", "mwanda", "sparsegpt"])
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every method this many times, interleaved (a b a b ...); the report gives each run's "
        "median and every measurement",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "prune_speed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    measurements: dict[str, list[dict]] = {name: [] for name in args.runs}
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    # Interleaved, so that a slow spell of this shared machine falls on every method alike.
    for name in [name for _ in range(args.repeats) for name in args.runs]:
        print(f"[prune_speed] running {name} ...", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, *passthrough, "--worker", name],
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            sys.stderr.write(out.stderr[-4000:])
            raise SystemExit(f"{name} failed with exit code {out.returncode}")
        measurements[name].append(json.loads(line[len("RESULT ") :]))
        print(
            f"[prune_speed] {name}: {measurements[name][-1]['seconds']:.1f} s, "
            f"peak RSS {measurements[name][-1]['peak_rss_mb']:.0f} MB"
        )
    results = {name: median_run(runs) for name, runs in measurements.items()}

    summary = {
        "command": "python benchmarks/prune_speed.py " + " ".join(passthrough),
        "machine": {
            "cpu_threads": args.threads,
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "output")},
        "results": results,
        "ratios": {f"{name}/floor": res["ratio_to_floor"] for name, res in results.items()},
    }
    if "wanda" in results:
        wanda = results["wanda"]
        for name, res in results.items():
            if name not in ("wanda", "floor_with_logits"):
                # Both: the raw seconds (same machine, minutes apart) and the ratio of the runs' ratios to
                # their own floors (which cancels a load that changed between the processes).
                summary["ratios"][f"{name}/wanda seconds"] = res["seconds"] / wanda["seconds"]
                summary["ratios"][f"{name}/wanda"] = res["ratio_to_floor"] / wanda["ratio_to_floor"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    lines = [
        "# Prune speed",
        "",
        f"Command: `{summary['command']}`  ",
        f"Tokens: {next(iter(results.values()))['tokens']} calibration tokens, {args.threads} CPU threads, "
        f"{platform.platform()}",
        "",
        "| run | seconds | statistics / pruning / propagation s | floor seconds (same process) | x floor "
        "| peak RSS (MB) | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, res in results.items():
        phases = res.get("timings", {})
        phase_text = " / ".join(
            f"{phases[k]:.1f}" for k in ("statistics", "pruning", "propagation") if k in phases
        )
        lines.append(
            f"| {name} | {res['seconds']:.1f} | {phase_text or '-'} | {res['floor_seconds']:.1f} | "
            f"{res['ratio_to_floor']:.2f} | {res['peak_rss_mb']:.0f} | {res['load_average_1min']:.1f} |"
        )
    lines += ["", *(f"- {k}: {v:.2f}" for k, v in summary["ratios"].items() if "/wanda" in k)]
    if args.repeats > 1:
        lines += [
            "",
            f"Each row is the median of {args.repeats} interleaved runs (by seconds); every run's seconds "
            "and ratio to its floor:",
            "",
            *(
                f"- {name}: "
                + ", ".join(
                    f"{s:.1f} s ({r:.2f}x)" for s, r in zip(res["all_seconds"], res["all_ratio_to_floor"])
                )
                for name, res in results.items()
            ),
        ]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
