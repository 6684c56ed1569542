"""What ``checkpoint_dir`` costs on Gemma 3 270M, as ratios to a plain forward pass of the decoder.

- the floor: one forward pass of ``model.get_decoder()`` (no LM head) over the calibration-sized token
  batch (``--samples`` sequences of ``--seq-len`` tokens), the least work any calibration-based pruner does;
- the run fingerprint's weight digest (:func:`optimum_mwanda.resume.model_weights_digest`: sha256 of every
  parameter), paid once per ``prune_model`` call with a checkpoint;
- one decoder layer's checkpoint step: ``save_layer`` of its pruned linear weights and ``save_progress``
  with that many hidden states (each file written, fsynced, renamed, folder fsynced), paid once per layer;
- loading it back as a resume does (checksums verified).

Usage (the committed results came from exactly this)::

    python benchmarks/resume_cost.py        # demo model, 56 x 512 tokens (7 languages x 8 x 512)

Writes ``benchmarks/results/resume_cost.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=56)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from optimum_mwanda.demo import demo_model_path
    from optimum_mwanda.modeling import WalkProgress, find_decoder_stack, find_prunable_linears
    from optimum_mwanda.resume import ResumeCheckpoint, model_weights_digest

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path()).eval()
    parameters = sum(p.numel() for p in model.parameters())
    decoder = model.get_decoder()
    tokens = torch.randint(3, 5000, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        with torch.no_grad():
            for start in range(0, args.samples, args.batch_size):
                decoder(input_ids=tokens[start : start + args.batch_size])

    model_weights_digest(model)  # touch every page once: the pruning run reads the weights anyway
    floor = _best_of(forward, 1)
    digest = _best_of(lambda: model_weights_digest(model), args.repeats)

    stack = find_decoder_stack(model)
    layer = {m.name: m.read_weight() for m in find_prunable_linears(stack.layers[0], stack.layer_name(0), [])}
    hidden = [
        torch.randn(args.batch_size, args.seq_len, model.config.hidden_size)
        for _ in range(args.samples // args.batch_size)
    ]
    layer_bytes = sum(w.numel() * w.element_size() for w in layer.values())
    hidden_bytes = sum(h.numel() * h.element_size() for h in hidden)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as folder:
        checkpoint = ResumeCheckpoint(Path(folder) / "ckpt", "benchmark")
        state = WalkProgress()
        checkpoint.save_progress(state, None)
        steps = iter(range(1, 10_000))

        def step() -> None:
            index = next(steps)
            checkpoint.save_layer(index - 1, layer)
            state.completed_layers = index
            checkpoint.save_progress(state, hidden)

        save = _best_of(step, args.repeats)

        def load() -> None:
            resumed = ResumeCheckpoint(Path(folder) / "ckpt", "benchmark")
            resumed.load_state()
            resumed.load_layer(0)
            resumed.load_hidden()

        # load_state verifies every file; a resume then reads one layer file per finished layer.
        load = _best_of(load, args.repeats)

    load_average = os.getloadavg()
    result = {
        "model": "gemma-3-270m (demo, float32)",
        "parameters": parameters,
        "tokens": [args.samples, args.seq_len],
        "threads": args.threads,
        "load_average": [round(x, 2) for x in load_average],
        "floor_forward_s": round(floor, 3),
        "weights_digest_s": round(digest, 3),
        "layer_checkpoint_step_s": round(save, 3),
        "layer_checkpoint_bytes": layer_bytes + hidden_bytes,
        "resume_load_s": round(load, 3),
        "ratios_to_floor": {
            "weights_digest": round(digest / floor, 4),
            "layer_checkpoint_step": round(save / floor, 4),
            "layer_checkpoint_step_x_layers": round(save * len(stack.layers) / floor, 4),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resume_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    ratios = result["ratios_to_floor"]
    (RESULTS / "resume_cost.md").write_text(
        "# What checkpoint_dir costs (Gemma 3 270M, float32)\n\n"
        f"`python benchmarks/resume_cost.py`; {args.threads} torch threads, load average "
        f"{load_average[0]:.2f} / {load_average[1]:.2f} / {load_average[2]:.2f} (shared 2-core machine: "
        "timings are noisy, the ratios are what to read).\n\n"
        "| what | seconds | ratio to one decoder forward pass |\n|---|---:|---:|\n"
        f"| floor: decoder forward over {args.samples} x {args.seq_len} tokens | {floor:.2f} | 1 |\n"
        f"| weights digest (sha256 of {parameters / 1e6:.0f}M parameters), once per run | {digest:.2f} | "
        f"{ratios['weights_digest']:.3f} |\n"
        f"| one layer's checkpoint step ({(layer_bytes + hidden_bytes) / 2**20:.0f} MiB written, fsynced) | "
        f"{save:.2f} | {ratios['layer_checkpoint_step']:.3f} |\n"
        f"| all {len(stack.layers)} layers' checkpoint steps | {save * len(stack.layers):.2f} | "
        f"{ratios['layer_checkpoint_step_x_layers']:.3f} |\n"
        f"| resume: load + verify state, one layer, hidden states | {load:.2f} | {load / floor:.3f} |\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
