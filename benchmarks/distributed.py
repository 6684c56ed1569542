"""Data-parallel pruning on CPU: prune time, per-rank peak memory and communication for 1 and N processes.

Every run is a fresh set of processes (``torch.multiprocessing.spawn``, gloo, file rendezvous) that loads the
demo model (Gemma 3 270M, float32) and prunes it on the same calibration set; one process runs without a
process group. Per rank it records the prune seconds (``PruningReport.timings``), the peak resident memory,
the bytes of its calibration activations, and the bytes it all-reduced / all-gathered / broadcast (counted by
wrapping the ``torch.distributed`` collectives), from which the per-layer communication volume follows. The
pruned weights of every run are compared (checksums) with the one-process run.

    nice -n 5 python benchmarks/distributed.py --output benchmarks/results/distributed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import load_average, write_record

METHODS = ("wanda", "mwanda", "sparsegpt")
LANGUAGES = ["ar", "de", "en", "es", "ru", "sw", "zh"]


def weight_digest(weight: torch.Tensor) -> str:
    """sha256 of a weight's bytes: equal digests mean bit-identical pruned weights across runs."""
    data = weight.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _count_collectives(counter: dict[str, int]) -> None:
    dist = torch.distributed

    def wrap(name: str):
        original = getattr(dist, name)

        def counted(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            counter[name] = counter.get(name, 0) + sum(t.numel() * t.element_size() for t in tensors)
            return original(tensor, *args, **kwargs)

        setattr(dist, name, counted)

    for name in ("all_reduce", "broadcast", "all_gather"):
        wrap(name)


def worker(rank: int, world_size: int, init_file: str, args: dict, out: str) -> None:
    torch.set_num_threads(args["threads"])
    from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
    from optimum_mwanda.calibration import build_calibration, load_bundled_corpus
    from optimum_mwanda.demo import load_demo_model
    from optimum_mwanda.distributed import local_indices

    counter: dict[str, int] = {}
    if world_size > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        _count_collectives(counter)
    model, tokenizer = load_demo_model(torch.float32)
    calibration = build_calibration(
        load_bundled_corpus("calibration", LANGUAGES),
        tokenizer,
        samples_per_language=args["samples_per_language"],
        seq_len=args["seq_len"],
        seed=0,
    )
    config_class = {"wanda": WandaConfig, "mwanda": MWandaConfig, "sparsegpt": SparseGPTConfig}[
        args["method"]
    ]
    config = config_class(
        sparsity=0.5, samples_per_language=args["samples_per_language"], calibration_seq_len=args["seq_len"]
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load = load_average()
    report = Pruner(config).prune_model(model, calibration, show_progress=False)
    local = len(local_indices(calibration.languages))
    result = {
        "rank": rank,
        "seconds": report.timings["total"],
        "timings": report.timings,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mb": rss_before / 1024,
        "local_sequences": local,
        "activation_mb": local * args["seq_len"] * model.config.hidden_size * 4 / 2**20,
        "bytes": counter,
        "num_layers": model.config.num_hidden_layers,
        "load_average": [load, load_average()],
        "checksum": [weight_digest(model.get_submodule(n).weight) for n in sorted(report.module_sparsity)],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if world_size > 1:
        torch.distributed.destroy_process_group()


def run(world_size: int, args: dict) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(
            worker,
            args=(world_size, str(Path(folder) / "rendezvous"), args, folder),
            nprocs=world_size,
            join=True,
        )
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--samples-per-language", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--output", default="benchmarks/results/distributed")
    args = parser.parse_args()
    record: dict = {"settings": vars(args), "cpu_count": os.cpu_count(), "runs": {}}
    for method in args.methods:
        for world_size in args.world_sizes:
            settings = dict(vars(args), method=method)
            start = time.perf_counter()
            ranks = run(world_size, settings)
            record["runs"][f"{method}-{world_size}"] = {
                "wall_seconds": time.perf_counter() - start,
                "ranks": ranks,
            }
            print(
                f"[distributed] {method} x{world_size}: {max(r['seconds'] for r in ranks):.1f} s", flush=True
            )
    write_record(args.output, record, markdown(record))


def markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        "# Data-parallel pruning on CPU (Gemma 3 270M demo model, gloo)",
        "",
        f"Command: `nice -n 5 python benchmarks/distributed.py --samples-per-language {s['samples_per_language']} "
        f"--seq-len {s['seq_len']} --threads {s['threads']}`  ",
        f"Calibration: {len(LANGUAGES)} languages x {s['samples_per_language']} sequences x {s['seq_len']} "
        f"tokens; {s['threads']} torch thread(s) per process on a {record['cpu_count']}-core machine shared "
        "with other jobs.",
        "",
        "| method | processes | prune s (slowest rank) | peak RSS per rank MB | activations per rank MB "
        "| all-reduce MB per layer | other collectives MB total | weights = 1 process | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, run in record["runs"].items():
        method, world = name.rsplit("-", 1)
        ranks = run["ranks"]
        reference = record["runs"].get(f"{method}-1", {}).get("ranks", [{}])[0].get("checksum")
        same = all(r["checksum"] == reference for r in ranks) if reference else "n/a"
        reduced = ranks[0]["bytes"].get("all_reduce", 0) / ranks[0]["num_layers"] / 2**20
        other = (ranks[0]["bytes"].get("all_gather", 0) + ranks[0]["bytes"].get("broadcast", 0)) / 2**20
        loads = [x for r in ranks for x in r["load_average"]]
        rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in ranks)
        activations = " / ".join(f"{r['activation_mb']:.1f}" for r in ranks)
        lines.append(
            f"| {method} | {world} | {max(r['seconds'] for r in ranks):.1f} | {rss} | {activations} | "
            f"{reduced:.2f} | {other:.3f} | {same} | {min(loads):.1f}-{max(loads):.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
