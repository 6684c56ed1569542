"""Time of SparseGPT's column sweep by chunk size, on one decoder layer's shapes of Gemma 3 270M.

Inside each block of 128 columns, the sweep (``methods/sparsegpt.py:_greedy_sweep``) gives each column a
rank-1 update of the rest of its chunk and one product per chunk for the rest of the block. A chunk of 128
(the whole block) is the sweep as it was before chunking: every column updates the rest of the block.
The four shared-input groups of one layer (q/k/v, o, gate/up, down: stacked rows 1536 / 640 / 4096 / 640 by
``in`` 640 / 1024 / 640 / 2048) are pruned at 2:4 and unstructured 50% with the M-Wanda sweep's settings
(shrinkage 0.1, no refinement), on Hessians of random inputs with uneven feature scales. Every chunk size
runs in the same process, interleaved, ``--repeats`` times; the table gives the fastest and the median
seconds per layer, the speed-up against the 128 chunk, and the largest weight difference from it (the
same arithmetic in another order: float32 rounding only; the masks are compared too).

Usage (the committed output came from exactly this, on an idle machine)::

    python benchmarks/sweep_chunk_speed.py > benchmarks/results/sweep_chunk_speed.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from optimum_mwanda.parts import sparsegpt as sweep_module

GROUPS = {
    "q/k/v": ([1024, 256, 256], 640),
    "o": ([640], 1024),
    "gate/up": ([2048, 2048], 640),
    "down": ([640], 2048),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunks", type=int, nargs="+", default=[128, 4, 8, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    cases = []
    for rows, in_features in GROUPS.values():
        x = torch.randn(4096, in_features, generator=generator) * torch.rand(in_features, generator=generator)
        hessian = 2 * x.t() @ x / x.shape[0]
        cases.append(([torch.randn(r, in_features, generator=generator) for r in rows], hessian))
    default_chunk = sweep_module._SWEEP_CHUNK
    load_before = os.getloadavg()[0]
    print(f"# Sweep time by chunk size (one Gemma 3 270M layer, {args.threads} threads)\n")
    for structure, nm in (("2:4", (2, 4)), ("unstructured 50%", None)):
        times: dict[int, list[float]] = {c: [] for c in args.chunks}
        outputs: dict[int, list] = {}
        for _ in range(args.repeats):
            for chunk in args.chunks:
                sweep_module._SWEEP_CHUNK = chunk
                start = time.perf_counter()
                out = [
                    sweep_module.sparsegpt_prune_group(weights, hessian, 0.5, nm, 128, 0.01, 0.1)
                    for weights, hessian in cases
                ]
                times[chunk].append(time.perf_counter() - start)
                outputs[chunk] = out
        sweep_module._SWEEP_CHUNK = default_chunk
        reference = outputs[128] if 128 in outputs else outputs[args.chunks[0]]
        print(f"## {structure}\n")
        print("| chunk | fastest s | median s | speed-up vs 128 (fastest) | max weight diff | mask diffs |")
        print("|---:|---:|---:|---:|---:|---:|")
        base = min(times[128]) if 128 in times else None
        for chunk in args.chunks:
            diff = max(
                float((a - b).abs().max())
                for (new, _), (ref, _) in zip(outputs[chunk], reference)
                for a, b in zip(new, ref)
            )
            masks = sum(
                int((a != b).sum())
                for (_, new), (_, ref) in zip(outputs[chunk], reference)
                for a, b in zip(new, ref)
            )
            speedup = f"{base / min(times[chunk]):.2f}x" if base else ""
            print(
                f"| {chunk}{' (default)' if chunk == default_chunk else ''} | {min(times[chunk]):.3f} | "
                f"{statistics.median(times[chunk]):.3f} | {speedup} | {diff:.1e} | {masks} |"
            )
        print()
    print(f"Load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
