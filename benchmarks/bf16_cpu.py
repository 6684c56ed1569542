"""bfloat16 on CPU: prune the demo model (Gemma 3 270M) loaded in bfloat16 and compare with float32 pruning.

For Wanda and M-Wanda (defaults) at 50%: the same calibration set pruned once on the float32 model and once
on the bfloat16 model (statistics are accumulated in float32/float64 either way; the new weights are written
back in bfloat16). Reports held-out perplexity per language of

- the bf16-pruned model run in bf16 (what a bf16 user gets) and upcast to fp32 (pruning difference only),
- the fp32-pruned model in fp32 (the reference), and the dense model in both dtypes (bf16 inference cost),

plus the share of mask entries on which bf16 and fp32 pruning agree. Writes ``OUTPUT.json`` and ``OUTPUT.md``.

    nice -n 5 python benchmarks/bf16_cpu.py --output benchmarks/results/bf16_cpu
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from common import load_average, write_record

from optimum_mwanda import MWandaConfig, Pruner, WandaConfig
from optimum_mwanda.calibration import build_calibration, load_bundled_corpus
from optimum_mwanda.demo import load_demo_model
from optimum_mwanda.evaluation import evaluate_perplexity, geometric_mean

LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples-per-language", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["wanda", "mwanda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--upcast-eval", action="store_true", help="also evaluate the bf16-pruned weights in fp32"
    )
    parser.add_argument("--output", default="benchmarks/results/bf16_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model32, tokenizer = load_demo_model(torch.float32)
    dense32 = {k: v.clone() for k, v in model32.state_dict().items()}
    model16, _ = load_demo_model(torch.bfloat16)
    dense16 = {k: v.clone() for k, v in model16.state_dict().items()}
    texts = load_bundled_corpus("calibration", LANGUAGES)
    calibration = build_calibration(
        texts, tokenizer, samples_per_language=args.samples_per_language, seq_len=args.seq_len, seed=0
    )
    heldout = load_bundled_corpus("heldout", LANGUAGES)

    def evaluate(model) -> dict[str, float]:
        return evaluate_perplexity(
            model,
            tokenizer,
            heldout,
            seq_len=args.eval_seq_len,
            max_windows=args.max_windows,
            show_progress=False,
        )

    record: dict = {
        "settings": vars(args),
        "calibration_tokens": sum(calibration.token_counts.values()),
        "torch": torch.__version__,
        "runs": {},
    }
    t = time.perf_counter()
    record["runs"]["dense"] = {"fp32": evaluate(model32), "bf16": evaluate(model16)}
    print(f"[bf16] dense evaluated ({time.perf_counter() - t:.0f} s)", flush=True)

    for method in args.methods:
        config = (MWandaConfig if method == "mwanda" else WandaConfig)(
            sparsity=0.5, samples_per_language=args.samples_per_language, calibration_seq_len=args.seq_len
        )
        run: dict = {}
        masks = {}
        for dtype, model, dense in (("fp32", model32, dense32), ("bf16", model16, dense16)):
            model.load_state_dict(dense)
            load_before = load_average()
            pruner = Pruner(config)
            report = pruner.prune_model(model, calibration, show_progress=False)
            run[f"prune_seconds_{dtype}"] = report.timings["total"]
            run[f"load_average_{dtype}"] = [load_before, load_average()]
            run[f"achieved_sparsity_{dtype}"] = report.achieved_sparsity
            masks[dtype] = {name: model.get_submodule(name).weight == 0 for name in report.module_sparsity}
            assert all(v.dtype == dense[k].dtype for k, v in model.state_dict().items()), "dtype changed"
            run[f"ppl_{dtype}"] = evaluate(model)
            if dtype == "bf16" and args.upcast_eval:
                model.float()  # the bf16-pruned weights, run in fp32: the pruning difference alone
                run["ppl_bf16_pruned_fp32_eval"] = evaluate(model)
                model.to(torch.bfloat16)
            print(f"[bf16] {method} {dtype}: {report.timings['total']:.0f} s", flush=True)
        agree = sum(int((masks["fp32"][k] == masks["bf16"][k]).sum()) for k in masks["fp32"])
        total = sum(masks["fp32"][k].numel() for k in masks["fp32"])
        run["mask_agreement"] = agree / total
        record["runs"][method] = run

    write_record(args.output, record, markdown(record))


def markdown(record: dict) -> str:
    s = record["settings"]
    dense = record["runs"]["dense"]
    lines = [
        "# bfloat16 pruning on CPU (Gemma 3 270M demo model)",
        "",
        f"Command: `nice -n 5 python benchmarks/bf16_cpu.py --samples-per-language {s['samples_per_language']} "
        f"--seq-len {s['seq_len']} --max-windows {s['max_windows']} --eval-seq-len {s['eval_seq_len']}"
        + (" --upcast-eval" if s.get("upcast_eval") else "")
        + "`  ",
        f"Calibration: {len(LANGUAGES)} languages ({', '.join(LANGUAGES)}) x {s['samples_per_language']} "
        f"sequences x {s['seq_len']} tokens ({record['calibration_tokens']} tokens), seed 0; held-out: bundled "
        f"corpus, first {s['max_windows']} windows of {s['eval_seq_len']} tokens per language; "
        f"{s['threads']} threads, torch {record['torch']}.",
        "",
        "Perplexity, geometric mean over the languages (per language in the JSON file):",
        "",
        "| model | fp32 pruning, fp32 run | bf16 pruning, bf16 run | bf16 / fp32 | bf16 pruning, fp32 run "
        "| bf16 / fp32 | mask agreement | prune s fp32 / bf16 | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| dense | {geometric_mean(dense['fp32'].values()):.2f} | {geometric_mean(dense['bf16'].values()):.2f} | "
        f"{geometric_mean(dense['bf16'].values()) / geometric_mean(dense['fp32'].values()):.4f} | | | | | |",
    ]
    for method, run in record["runs"].items():
        if method == "dense":
            continue
        p32 = geometric_mean(run["ppl_fp32"].values())
        p16 = geometric_mean(run["ppl_bf16"].values())
        upcast = run.get("ppl_bf16_pruned_fp32_eval")
        p16_32 = geometric_mean(upcast.values()) if upcast else math.nan
        loads = run["load_average_fp32"] + run["load_average_bf16"]
        lines.append(
            f"| {method} 50% | {p32:.2f} | {p16:.2f} | {p16 / p32:.4f} | {p16_32:.2f} | {p16_32 / p32:.4f} | "
            f"{100 * run['mask_agreement']:.2f}% | {run['prune_seconds_fp32']:.0f} / "
            f"{run['prune_seconds_bf16']:.0f} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    lines += ["", "Per language (bf16 pruning in bf16 vs fp32 pruning in fp32):", ""]
    lines.append("| model | " + " | ".join(LANGUAGES) + " |")
    lines.append("|---|" + "---:|" * len(LANGUAGES))
    for method, run in record["runs"].items():
        if method == "dense":
            continue
        ratios = [run["ppl_bf16"][lang] / run["ppl_fp32"][lang] for lang in LANGUAGES]
        lines.append(f"| {method} | " + " | ".join(f"{r:.4f}" for r in ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
