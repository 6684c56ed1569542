"""Scale on paper and in one layer: the memory and time to prune Llama-3.1-8B / 70B and Qwen3-30B-A3B.

Builds ONE decoder layer with a model's real shapes (transformers' own classes from the model's config with
``num_hidden_layers=1`` and a small vocabulary; seeded random weights, float32 on this CPU), feeds it a
calibration slice (random token ids in 4 "languages", ``--sequences`` x ``--seq-len`` tokens each) and
runs ``Pruner.prune_model`` on it (the propagation pass skipped: one layer's outputs are not needed), one fresh process per measurement (so that peak RSS belongs to that run
alone; ``MALLOC_MMAP_THRESHOLD_`` is fixed so that freed tensors leave the RSS). The worker wraps the
method's statistics and update and records, from ``/proc/self/status`` (``VmRSS``, and ``VmHWM`` reset
through ``/proc/self/clear_refs``), in bytes:

- ``statistics``: the statistics' tensors, counted exactly (``raw_sums``), and the RSS they hold;
- ``update``: per shared-input group, the peak RSS of its update above the RSS before it, plus the group's
  own statistic (which the update frees): what :func:`optimum_mwanda.memory.update_peak` predicts;
- ``step``: the peak RSS of the whole layer step (statistics pass and every update) above the RSS when
  the statistics began (the weights, inputs and activation store were already there);

and the seconds of each phase. ``python benchmarks/scale.py report`` compares them with the formulas of
``optimum_mwanda.memory`` and writes the predicted full-model table (bf16 weights and activations, one layer
on the GPU at a time, 128 x 2048 calibration tokens).

Usage (the committed results came from exactly these)::

    python benchmarks/scale.py run --model llama-3.1-8b --seq-len 512 --refinement-steps 1
    python benchmarks/scale.py run --model llama-3.1-70b --only attention --seq-len 512 \
        --statistics-dtype float32 --refinement-steps 1 --methods sparsegpt mwanda_sweep
    python benchmarks/scale.py group --in-features 4096 --rows 4096 1024 1024 --method sparsegpt
    python benchmarks/scale.py group --in-features 4096 --rows 4096 1024 1024 --method mwanda_sweep \
        --statistics-dtype float32 --refinement-steps 1
    python benchmarks/scale.py report

Writes ``benchmarks/results/scale.json`` and ``scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
LANGUAGES = ["en", "de", "sw", "zh"]
METHODS = ("wanda", "mwanda_closed_form", "sparsegpt", "mwanda_sweep")
STRUCTURES = ("50%", "2:4")

#: the real shapes (transformers config fields) of the models studied
MODELS: dict[str, dict] = {
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "layers": 32,
    },
    "llama-3.1-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "layers": 80,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "layers": 48,
    },
}
#: which modules a partial measurement keeps (the rest are ignored: neither measured nor pruned)
ONLY = {
    "attention": ["mlp."],
    "mlp": ["self_attn."],
    "gate_up": ["self_attn.", "mlp.down_proj"],
}


# ---------------------------------------------------------------------------------------------------------
# worker (one measurement per process)
# ---------------------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _tensor_bytes(statistic) -> int:
    total = sum(t.numel() * t.element_size() for t in statistic.raw_sums().values())
    sketch = getattr(statistic, "sketch", None)
    if sketch is not None:
        total += sketch.test_matrix.numel() * sketch.test_matrix.element_size()
    return total


def build_layer_model(name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in MODELS[name].items() if k != "layers"}
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(
        model_type, num_hidden_layers=1, vocab_size=1024, max_position_embeddings=4096, **fields
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def pruning_config(method: str, structure: str, sequences: int, seq_len: int, refinement_steps: int | None):
    from optimum_mwanda import MWandaConfig, SparseGPTConfig, WandaConfig

    common: dict = {"samples_per_language": sequences, "calibration_seq_len": seq_len, "batch_size": 1}
    common |= {"mask_structure": "2:4"} if structure == "2:4" else {"sparsity": 0.5}
    if method == "wanda":
        return WandaConfig(**common)
    if method == "sparsegpt":
        return SparseGPTConfig(**common)
    update = "sweep" if method == "mwanda_sweep" else "closed_form"
    extra = (
        {"refinement_steps": refinement_steps} if update == "sweep" and refinement_steps is not None else {}
    )
    return MWandaConfig(weight_update=update, **common, **extra)


def worker(args) -> dict:
    import torch

    import optimum_mwanda.pruner as pruner_module
    from optimum_mwanda import Pruner

    torch.set_num_threads(args.threads)
    model = build_layer_model(args.model)
    config = pruning_config(args.method, args.structure, args.sequences, args.seq_len, args.refinement_steps)
    config.ignore = ONLY[args.only] if args.only else []
    generator = torch.Generator().manual_seed(0)
    calibration = {
        language: torch.randint(3, 1024, (args.sequences, args.seq_len), generator=generator)
        for language in LANGUAGES
    }
    record: dict = {"groups": [], "rss_at_start": _status("VmRSS")}
    statistics: list = []
    original_algorithm_for = pruner_module.algorithm_for

    def instrumented(cfg):
        algorithm = original_algorithm_for(cfg)
        new_statistic, prune_group = algorithm.new_statistic, algorithm.prune_group

        def counted_statistic(*a, **k):
            if not statistics:
                record["baseline_rss"] = _status("VmRSS")
                record["statistics_started"] = time.perf_counter()
                _reset_peak()
            statistic = new_statistic(*a, **k)
            statistics.append(statistic)
            return statistic

        def measured_prune(name, weights, statistic, negative, sparsity):
            if "statistics_bytes" not in record:
                record["statistics_pass_peak"] = _status("VmHWM") - record["baseline_rss"]
                record["statistics_rss"] = _status("VmRSS") - record["baseline_rss"]
                record["statistics_bytes"] = sum(_tensor_bytes(s) for s in statistics)
                record["statistics_seconds"] = time.perf_counter() - record["statistics_started"]
                record["step_peak"] = record["statistics_pass_peak"]
            own = _tensor_bytes(statistic)
            before = _status("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            result = prune_group(name, weights, statistic, negative, sparsity)
            seconds = time.perf_counter() - start
            hwm = _status("VmHWM")
            record["groups"].append(
                {
                    "name": name,
                    "in_features": int(weights[0].shape[1]),
                    "rows": [int(w.shape[0]) for w in weights],
                    "statistic_bytes": own,
                    "update_peak": hwm - before + own,
                    "rss_before": before - record["baseline_rss"],
                    "seconds": seconds,
                }
            )
            record["step_peak"] = max(record["step_peak"], hwm - record["baseline_rss"])
            return result

        algorithm.new_statistic = counted_statistic
        algorithm.prune_group = measured_prune
        return algorithm

    pruner_module.algorithm_for = instrumented
    # One layer: its outputs (the next layer's inputs) are never used, so the propagation pass is skipped.
    from optimum_mwanda.modeling import walk

    walk.SequentialWalk._propagate = lambda *a, **k: None
    dtype = getattr(torch, args.statistics_dtype)
    start = time.perf_counter()
    report = Pruner(config).prune_model(model, calibration, show_progress=False, statistics_dtype=dtype)
    record.update(
        seconds=time.perf_counter() - start,
        timings=report.timings,
        process_peak=_status("VmHWM"),
        tokens=sum(report.token_counts.values()),
        languages=len(LANGUAGES),
        achieved_sparsity=report.achieved_sparsity,
        refinement_steps=getattr(config, "refinement_steps", 0),
        load_average=os.getloadavg(),
    )
    record.pop("statistics_started", None)
    return record


def group_worker(args) -> dict:
    """One shared-input group's update alone (random weights and tokens): the update peak above the RSS
    before it, plus the group's own statistic, as in :func:`worker`."""
    import torch

    from optimum_mwanda.configuration import SparseGPTConfig
    from optimum_mwanda.methods import algorithm_for

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    config = pruning_config(args.method, args.structure, 1, 16, args.refinement_steps)
    if isinstance(config, SparseGPTConfig) or args.method == "mwanda_sweep":
        config = config.resolve(args.tokens, [args.in_features])
    algorithm = algorithm_for(config)
    algorithm.calibration_tokens = args.tokens
    algorithm.statistics_dtype = getattr(torch, args.statistics_dtype)
    statistic = algorithm.new_statistic(args.in_features, 4, torch.device("cpu"))
    for _ in range(args.tokens // 512):
        x = torch.randn(512, args.in_features, generator=generator)
        statistic.update(x, torch.zeros(512, dtype=torch.long), 512)
    weights = [torch.randn(r, args.in_features, generator=generator) for r in args.rows]
    own = _tensor_bytes(statistic)
    before = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    algorithm.prune_group("group", weights, statistic, None, 0.5)
    return {
        "groups": [
            {
                "name": "group",
                "in_features": args.in_features,
                "rows": list(args.rows),
                "statistic_bytes": own,
                "update_peak": _status("VmHWM") - before + own,
                "seconds": time.perf_counter() - start,
            }
        ],
        "load_average": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------------------
# prediction
# ---------------------------------------------------------------------------------------------------------
def _spec(method: str, structure: str, statistics_dtype: str, refinement_steps: int, factor_kept=False):
    import dataclasses

    from optimum_mwanda.memory import MethodSpec

    config = pruning_config(method, structure, 1, 16, refinement_steps or None).resolve()
    spec = MethodSpec.from_config(
        config, languages=len(LANGUAGES), statistics_bytes=4 if statistics_dtype == "float32" else 8
    )
    return dataclasses.replace(spec, factor_kept=factor_kept)


#: runs measured before the sweep freed its inverse factor at the end of the column loop (its block views
#: kept it alive until the group ended): predicted with MethodSpec(factor_kept=True)
FACTOR_KEPT_BEFORE = "2026-12-06T21:52"


def predicted_step_on_cpu(spec, groups) -> int:
    """The measured step's counterpart: statistics, then each group's update with the later groups'
    statistics waiting and, for every group already pruned, the walk's two float32 copies of its weights
    (the originals kept for restore-on-failure, the pruned ones kept for the resume checkpoint)."""
    from optimum_mwanda.memory import statistic_bytes, update_peak

    stats = [statistic_bytes(spec, g) for g in groups]
    step, done = sum(stats), 0
    for index, group in enumerate(groups):
        step = max(step, sum(stats[index + 1 :]) + update_peak(spec, group) + done)
        done += 8 * group.params
    return step


def _measured_groups(entry: dict):
    from optimum_mwanda.memory import LinearGroup

    return [LinearGroup(g["name"], g["in_features"], tuple(g["rows"])) for g in entry["groups"]]


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def _key(args_or_entry) -> str:
    get = args_or_entry.get if isinstance(args_or_entry, dict) else lambda k: getattr(args_or_entry, k)
    only = get("only") or "layer"
    steps = get("refinement_steps")
    return f"{get('model')}|{only}|{get('method')}|{get('structure')}|{get('statistics_dtype')}" + (
        f"|cg{steps}" if steps is not None else ""
    )


def run(args) -> None:
    output = Path(args.output)
    data = json.loads(output.with_suffix(".json").read_text()) if output.with_suffix(".json").exists() else {}
    data.setdefault("runs", {})
    for method in args.methods:
        for structure in args.structures:
            entry = {
                "model": args.model,
                "only": args.only,
                "method": method,
                "structure": structure,
                "statistics_dtype": args.statistics_dtype,
                "refinement_steps": args.refinement_steps,
                "sequences": args.sequences,
                "seq_len": args.seq_len,
            }
            key = _key(entry)
            if key in data["runs"] and not args.force:
                print(f"{key}: cached", flush=True)
                continue
            command = [
                sys.executable,
                __file__,
                "measure",
                *("--model", args.model, "--method", method, "--structure", structure),
                *("--sequences", str(args.sequences), "--seq-len", str(args.seq_len)),
                *("--statistics-dtype", args.statistics_dtype, "--threads", str(args.threads)),
                *(("--only", args.only) if args.only else ()),
                *(
                    ("--refinement-steps", str(args.refinement_steps))
                    if args.refinement_steps is not None
                    else ()
                ),
            ]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
            print(f"{key}: running (load average {os.getloadavg()[0]:.1f})", flush=True)
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], flush=True)
                raise SystemExit(f"{key} failed")
            entry.update(json.loads(done.stdout.strip().splitlines()[-1]))
            entry["measured_at"] = time.strftime("%Y-%m-%dT%H:%M")
            data["runs"][key] = entry
            data["platform"] = platform.platform()
            data["cpu_count"] = os.cpu_count()
            output.with_suffix(".json").write_text(json.dumps(data, indent=1))
            print(
                f"{key}: {entry['seconds']:.1f} s, step peak {entry['step_peak'] / 2**30:.2f} GiB",
                flush=True,
            )
    report(args)


def run_group(args) -> None:
    """Measure one group's update in a fresh process and add it to the JSON (as a one-group "layer")."""
    output = Path(args.output)
    path = output.with_suffix(".json")
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    command = [
        sys.executable,
        __file__,
        "group-measure",
        *("--in-features", str(args.in_features), "--rows", *map(str, args.rows)),
        *("--method", args.method, "--structure", args.structure, "--tokens", str(args.tokens)),
        *("--statistics-dtype", args.statistics_dtype, "--threads", str(args.threads)),
        *(("--refinement-steps", str(args.refinement_steps)) if args.refinement_steps is not None else ()),
    ]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-3000:], flush=True)
        raise SystemExit("group measurement failed")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    group = result["groups"][0]
    entry = {
        "model": "one group",
        "only": f"in {args.in_features}, rows {'+'.join(map(str, args.rows))}",
        "method": args.method,
        "structure": args.structure,
        "statistics_dtype": args.statistics_dtype,
        "refinement_steps": args.refinement_steps,
        "tokens": args.tokens,
        "statistics_bytes": group["statistic_bytes"],
        "step_peak": group["update_peak"],
        "statistics_seconds": 0.0,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M"),
        **result,
    }
    data["runs"][f"group|{entry['only']}|{args.method}|{args.structure}|{args.statistics_dtype}"] = entry
    path.write_text(json.dumps(data, indent=1))
    print(f"{entry['only']} {args.method}: update peak {group['update_peak'] / 2**30:.3f} GiB", flush=True)


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def report(args) -> None:
    from optimum_mwanda.memory import LayerShape, run_peak, statistic_bytes, update_peak

    output = Path(args.output)
    data = json.loads(output.with_suffix(".json").read_text())
    lines = [
        "# Scale: memory and time of one decoder layer, and the predicted full-model peaks",
        "",
        "Commands (each measurement in a fresh process): "
        "`python benchmarks/scale.py run --model llama-3.1-8b --seq-len 512 --refinement-steps 1` (stopped "
        "after SparseGPT 50%: the 2:4 sweep runs change no buffer and would have taken an hour more), "
        "`python benchmarks/scale.py run --model llama-3.1-8b --only attention --seq-len 512 "
        "--refinement-steps 1 --methods mwanda_sweep --structures 50%`, "
        "`python benchmarks/scale.py run --model llama-3.1-70b --only attention --seq-len 256 "
        "--statistics-dtype float32 --methods sparsegpt --structures 50%`, the two `group` commands of the "
        "script's docstring, then `python benchmarks/scale.py report`.",
        f"Machine: {data.get('platform')}, {data.get('cpu_count')} CPUs shared with other jobs; float32 weights "
        "and activations on the CPU; peak memory is peak RSS (VmHWM) of a fresh process per run, above the "
        "RSS when the layer's statistics began. Predictions: `optimum_mwanda.memory` (docs/large-models.md).",
        "",
        "## One layer, measured against the formula",
        "",
        "| model | part | method | structure | H dtype | tokens | statistics GiB (tensors / predicted) | "
        "largest update GiB (measured / predicted) | step GiB (measured / predicted) | worst error (any group) | "
        "statistics s | pruning s | load |",
        "|---|---|---|---|---|---:|---|---|---|---:|---:|---:|---:|",
    ]
    worst_overall = 0.0
    for _, entry in sorted(data["runs"].items()):
        spec = _spec(
            entry["method"],
            entry["structure"],
            entry["statistics_dtype"],
            entry["refinement_steps"],
            factor_kept=entry.get("measured_at", "") < FACTOR_KEPT_BEFORE,
        )
        groups = _measured_groups(entry)
        stats_pred = sum(statistic_bytes(spec, g) for g in groups)
        update_meas = max(g["update_peak"] for g in entry["groups"])
        update_pred = max(update_peak(spec, g) for g in groups)
        step_pred = predicted_step_on_cpu(spec, groups)
        # Every group's update too (above 64 MiB, where the RSS is not dominated by allocator noise).
        errors = [
            update_peak(spec, g) / m["update_peak"] - 1
            for g, m in zip(groups, entry["groups"])
            if m["update_peak"] > 2**26
        ]
        errors += [
            update_pred / update_meas - 1,
            step_pred / entry["step_peak"] - 1,
            stats_pred / entry["statistics_bytes"] - 1,
        ]
        worst = max(errors, key=abs)
        worst_overall = max(worst_overall, abs(worst))
        lines.append(
            f"| {entry['model']} | {entry['only'] or 'whole layer'} | {entry['method']}"
            f"{' (cg ' + str(entry['refinement_steps']) + ')' if entry.get('refinement_steps') else ''} | "
            f"{entry['structure']} | {entry['statistics_dtype'] if spec.sweep else '-'} | {entry['tokens']} | "
            f"{_gib(entry['statistics_bytes'])} / {_gib(stats_pred)} | {_gib(update_meas)} / {_gib(update_pred)} | "
            f"{_gib(entry['step_peak'])} / {_gib(step_pred)} | {100 * worst:+.0f}% | "
            f"{entry['statistics_seconds']:.1f} | {sum(g['seconds'] for g in entry['groups']):.1f} | "
            f"{entry['load_average'][0]:.1f} |"
        )
    lines += [
        "",
        f"Largest deviation of a prediction from its measurement: {100 * worst_overall:.0f}%.",
        "",
        "## Predicted peak GPU memory of a whole run (bf16)",
        "",
        "One decoder layer on the GPU at a time (the rest offloaded to CPU or disk), bf16 weights and "
        "activations, 128 x 2048 calibration tokens kept on the GPU between layers, batches of 4 x 2048 "
        "tokens; the predicted peak is one layer's weights and the walk's copy of its pruned weights, the "
        "activation store, and the larger of the statistics pass and the worst update. `fits` compares "
        "with 24 / 48 / 80 GB cards, less 1.5 GB for the CUDA context and allocator slack.",
        "",
        "| model | method | structure | H dtype | offload stats | statistics GiB | worst update GiB | "
        "activations GiB | peak GiB | 24 GB | 48 GB | 80 GB |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for model in MODELS:
        shape = LayerShape.from_config(_config(model))
        for method in METHODS:
            for structure in STRUCTURES:
                variants = [("float64", False)]
                if method in ("sparsegpt", "mwanda_sweep"):
                    variants += [("float32", False), ("float32", True)]
                for dtype, offload in variants:
                    spec = _spec(method, structure, dtype, None)
                    peak = run_peak(spec, shape, 128 * 2048, 4 * 2048, 2, 2, offload_statistics=offload)
                    fits = ["yes" if peak.total <= (gb - 1.5) * 1e9 else "no" for gb in (24, 48, 80)]
                    lines.append(
                        f"| {model} | {method} | {structure} | {dtype if spec.sweep else '-'} | "
                        f"{'yes' if offload else 'no'} | {_gib(peak.statistics)} | {_gib(peak.update)} | "
                        f"{_gib(peak.activations)} | {_gib(peak.total)} | {' | '.join(fits)} |"
                    )
    lines += ["", f"Load average when the report was written: {os.getloadavg()}", ""]
    output.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def _config(model: str):
    from transformers import AutoConfig

    fields = {k: v for k, v in MODELS[model].items() if k != "layers"}
    return AutoConfig.for_model(fields.pop("model_type"), num_hidden_layers=1, **fields)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("group", "group-measure"):
        g = sub.add_parser(name, help="one shared-input group's update alone")
        g.add_argument("--output", default=str(RESULTS / "scale"))
        g.add_argument("--in-features", type=int, required=True)
        g.add_argument("--rows", type=int, nargs="+", required=True)
        g.add_argument("--method", choices=("sparsegpt", "mwanda_sweep"), required=True)
        g.add_argument("--structure", choices=STRUCTURES, default="50%")
        g.add_argument("--tokens", type=int, default=2048)
        g.add_argument("--statistics-dtype", choices=["float64", "float32"], default="float64")
        g.add_argument("--refinement-steps", type=int, default=None)
        g.add_argument("--threads", type=int, default=2)
    for name in ("run", "measure", "report"):
        p = sub.add_parser(name)
        p.add_argument("--output", default=str(RESULTS / "scale"))
        if name == "report":
            continue
        p.add_argument("--model", choices=list(MODELS), default="llama-3.1-8b")
        p.add_argument("--only", choices=list(ONLY), default=None)
        p.add_argument("--sequences", type=int, default=1, help="sequences per language (4 languages)")
        p.add_argument("--seq-len", type=int, default=2048)
        p.add_argument("--statistics-dtype", choices=["float64", "float32"], default="float64")
        p.add_argument("--refinement-steps", type=int, default=None)
        p.add_argument("--threads", type=int, default=2)
        if name == "run":
            p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
            p.add_argument("--structures", nargs="+", choices=STRUCTURES, default=list(STRUCTURES))
            p.add_argument("--force", action="store_true")
        else:
            p.add_argument("--method", choices=METHODS, required=True)
            p.add_argument("--structure", choices=STRUCTURES, required=True)
    args = parser.parse_args()
    if args.command == "measure":
        print(json.dumps(worker(args)))
    elif args.command == "group-measure":
        print(json.dumps(group_worker(args)))
    elif args.command == "group":
        run_group(args)
    elif args.command == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
