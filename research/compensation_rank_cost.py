"""Prune time of M-Wanda's low-rank compensation against Wanda and means-only M-Wanda, in one process.

Same dense weights (restored between runs), same calibration token ids, 2 threads; ratios are what counts.
Usage: ``python research/compensation_rank_cost.py [--samples-per-language 2]``
(writes ``research/results/compensation_rank_cost.md``).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from optimum_mwanda import MWandaConfig, Pruner, WandaConfig
from optimum_mwanda.calibration import default_calibration
from optimum_mwanda.demo import load_demo_model

LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples-per-language", type=int, default=2)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "compensation_rank_cost.md"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_demo_model()
    dense = copy.deepcopy(model.state_dict())
    calibration = default_calibration(
        tokenizer, languages=LANGUAGES, samples_per_language=args.samples_per_language
    )
    configs = {
        "wanda": WandaConfig(),
        "mwanda (defaults, r=0)": MWandaConfig(),
        "mwanda compensation_rank=32": MWandaConfig(compensation_rank=32),
    }
    rows = []
    load_before = os.getloadavg()
    for name, config in configs.items():
        model.load_state_dict(dense)
        start = time.perf_counter()
        Pruner(config).prune_model(model, calibration, show_progress=False)
        rows.append((name, time.perf_counter() - start))
    base = rows[0][1]
    lines = [
        "# Prune time of the low-rank compensation (Gemma 3 270M, one process, 2 threads)",
        "",
        f"Calibration 7 languages x {args.samples_per_language} x 512 tokens. Load average before: "
        + " ".join(f"{v:.2f}" for v in load_before)
        + ", after: "
        + " ".join(f"{v:.2f}" for v in os.getloadavg())
        + " (2 cores).",
        "",
        "| config | seconds | vs Wanda |",
        "|---|---:|---:|",
    ] + [f"| {name} | {seconds:.1f} | {seconds / base:.2f}x |" for name, seconds in rows]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
