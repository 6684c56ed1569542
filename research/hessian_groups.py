"""What multiplying calibration sequences in groups saves in the Hessian's accumulation.

SparseGPT's and M-Wanda's sweep sum ``X^T X`` over the calibration sequences in float64, so that neither
batching nor data-parallel sharding changes the sum. With every 4th token sampled, one 512-token sequence
is a 128-token product, and adding a product into the float64 sum costs about as much as computing it.
``HessianStatistics(sequence_group=K)`` joins K consecutive sequences into one float32 product (the ranks
are dealt whole groups, so that a data-parallel run forms the same products). This times one decoder
layer's accumulation at Gemma 3 270M's shapes (inputs of 640, 1024, 640 and 2048 features; 56 sequences
of 512 tokens, every 4th token: the study's calibration budget) for each K, against the float32
accumulator (``statistics_dtype="float32"``), as medians of interleaved repeats in one process. Random
activations: the time does not depend on the values (the layer error of the grouped products is scored
on real activations by ``research/sweep_levers_layer.py``).

Usage (the committed output came from exactly this)::

    python research/hessian_groups.py --repeats 7 --threads 2 > research/results/hessian_groups.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from optimum_mwanda.parts import HessianStatistics
from optimum_mwanda.parts.statistics import sequence_group_for

INPUTS = {"q/k/v": 640, "o": 1024, "gate/up": 640, "down": 2048}
SEQUENCES, SEQ_LEN, STRIDE, BATCH = 56, 512, 4, 4


def accumulate(data: dict[str, torch.Tensor], group: int, dtype: torch.dtype) -> float:
    """Seconds to accumulate and release every group's ``H`` of one layer, batches of ``BATCH``."""
    start = time.perf_counter()
    for x in data.values():
        statistic = HessianStatistics(x.shape[-1], 1, token_stride=STRIDE, dtype=dtype, sequence_group=group)
        language = torch.zeros(BATCH * SEQ_LEN, dtype=torch.long)
        for i in range(0, len(x), BATCH):
            statistic.update(x[i : i + BATCH].reshape(-1, x.shape[-1]), language, SEQ_LEN)
        statistic.release_hessian()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    data = {name: torch.randn(SEQUENCES, SEQ_LEN, n, generator=generator) for name, n in INPUTS.items()}
    variants = {f"float64 sum, groups of {k}": (k, torch.float64) for k in (1, 2, 3, 4, 7, 8)}
    variants["float32 sum, one product per sequence"] = (1, torch.float32)
    variants[f"float32 sum, groups of {sequence_group_for(SEQUENCES)}"] = (
        sequence_group_for(SEQUENCES),
        torch.float32,
    )
    load = os.getloadavg()[0]
    accumulate(data, 1, torch.float64)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (group, dtype) in variants.items():
            times[name].append(accumulate(data, group, dtype))
    print("# The Hessian's accumulation with sequences multiplied in groups\n")
    print(
        f"One layer at Gemma 3 270M's shapes (inputs {', '.join(f'{k} {v}' for k, v in INPUTS.items())}), "
        f"{SEQUENCES} x {SEQ_LEN} tokens, every {STRIDE}th token, batches of {BATCH}; {args.threads} threads, "
        f"torch {torch.__version__}; median (min-max) of {args.repeats} interleaved repeats; load average "
        f"before {load:.2f}. `sequence_group_for({SEQUENCES})` = {sequence_group_for(SEQUENCES)}.\n"
    )
    reference = statistics.median(times["float64 sum, groups of 1"])
    print("| accumulation | seconds per layer | / one float64 product per sequence |\n|---|---|---:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} ({min(values):.3f}-{max(values):.3f}) | {median / reference:.2f} |")
    print(f"\nLoad average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
