"""How prune time and memory scale: with decoder layers, calibration tokens, and hidden size.

Synthetic Llama-style models built from configs (random weights: timing and memory do not depend on the
values), random calibration tokens. Every point runs in its own process, so peak RSS is that run's.

- time vs number of layers (Wanda, SparseGPT): expected linear;
- time vs calibration tokens (Wanda, SparseGPT): expected linear (plus a constant for the mask search);
- time vs hidden size for SparseGPT (Hessian ~ h^2 per token, inversion and sweep ~ h^3);
- peak RSS vs model size.

Usage: ``python benchmarks/scaling.py`` (writes ``benchmarks/results/scaling.{json,md,png}``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_mwanda import Pruner, SparseGPTConfig, WandaConfig

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    hidden = spec["hidden"]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=spec["layers"],
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 64),
        vocab_size=1024,
    )
    model = LlamaForCausalLM(config).eval()
    seq_len = 256
    n = spec["tokens"] // seq_len
    calibration = {"xx": torch.randint(0, 1024, (n, seq_len), generator=torch.Generator().manual_seed(1))}
    method = {"wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[spec["method"]](batch_size=4)
    start = time.perf_counter()
    report = Pruner(method).prune_model(model, calibration, show_progress=False)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {
        **spec,
        "seconds": seconds,
        "timings": report.timings,
        "parameters": params,
        "model_mb": params * 4 / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_1min": os.getloadavg()[0],
    }


def _run(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"run {spec} failed")
    result = json.loads(line[len("RESULT ") :])
    print(
        f"[scaling] {spec['method']:9s} layers={spec['layers']:2d} hidden={spec['hidden']:4d} "
        f"tokens={spec['tokens']:5d}: {result['seconds']:.2f} s, peak RSS {result['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return result


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, key, xlabel in (
        (axes[0], "layers", "decoder layers"),
        (axes[1], "tokens", "calibration tokens"),
        (axes[2], "hidden", "hidden size (SparseGPT)"),
    ):
        for method in ("wanda", "sparsegpt"):
            points = [r for r in results[key] if r["method"] == method]
            if points:
                ax.plot([p[key] for p in points], [p["seconds"] for p in points], "o-", label=method)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("prune time (s)")
        ax.grid(alpha=0.3)
        ax.legend()
    memory = results["hidden"] + results["layers"]
    axes[3].plot([r["model_mb"] for r in memory], [r["peak_rss_mb"] for r in memory], "o")
    axes[3].set_xlabel("model size (MB, fp32)")
    axes[3].set_ylabel("peak RSS (MB)")
    axes[3].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS / "scaling")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    base = {"layers": 4, "hidden": 512, "tokens": 4096, "threads": args.threads}
    results: dict[str, list[dict]] = {"layers": [], "tokens": [], "hidden": []}
    for method in ("wanda", "sparsegpt"):
        for layers in (2, 4, 8, 16):
            results["layers"].append(_run({**base, "method": method, "layers": layers}))
        for tokens in (1024, 2048, 4096, 8192):
            results["tokens"].append(_run({**base, "method": method, "tokens": tokens}))
    for hidden in (256, 512, 768, 1024):
        results["hidden"].append(_run({**base, "method": "sparsegpt", "hidden": hidden}))

    command = "python benchmarks/scaling.py" + " ".join(
        [""] + list(argv if argv is not None else sys.argv[1:])
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(
        json.dumps({"command": command, "results": results}, indent=2) + "\n"
    )
    _plot(results, args.output.with_suffix(".png"))
    lines = ["# Scaling", "", f"Command: `{command}`", ""]
    for key in ("layers", "tokens", "hidden"):
        lines += [
            f"## prune time vs {key}",
            "",
            "| method | layers | hidden | tokens | seconds | model MB | peak RSS MB |",
        ]
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in results[key]:
            lines.append(
                f"| {r['method']} | {r['layers']} | {r['hidden']} | {r['tokens']} | {r['seconds']:.2f} | "
                f"{r['model_mb']:.0f} | {r['peak_rss_mb']:.0f} |"
            )
        lines.append("")
    args.output.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
