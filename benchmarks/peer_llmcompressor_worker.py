"""One llm-compressor pruning run, inside llm-compressor's own virtualenv (started by peer_llmcompressor.py).

llm-compressor pins its own transformers, so this file imports nothing from optimum_mwanda: it reads the
calibration token ids that ``peer_llmcompressor.py`` saved (the very tensors our pruner gets), measures the
same floor as ``benchmarks/prune_speed.py`` (its ``forward_seconds``, loaded by path: it needs only torch),
runs ``llmcompressor.oneshot`` with ``WandaPruningModifier`` or ``SparseGPTModifier``, and saves the pruned
decoder weights as safetensors; perplexity is computed afterwards by our evaluation code, in our venv.

Prints one line ``RESULT {json}`` on success.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _prune_speed():
    spec = importlib.util.spec_from_file_location("prune_speed", HERE / "prune_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _modifier(method: str, sparsity: float, mask_structure: str):
    # lm_head is a Linear and llm-compressor's default targets ("Linear") include it; on Gemma 3 it is
    # tied to the embeddings. Our pruner never prunes it, so the comparison ignores it here too (the
    # modifier's own warning recommends exactly this ignore pattern).
    common = dict(sparsity=sparsity, mask_structure=mask_structure, ignore=["re:.*lm_head"])
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(**common)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(**common)
    raise SystemExit(f"unknown llm-compressor method {method!r}")


def _digest(tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--calibration", required=True, help="safetensors with input_ids, attention_mask")
    parser.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--mask-structure", default="0:0", help="llm-compressor notation: 0:0 or N:M")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", required=True, help="safetensors file for the pruned decoder weights")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    tensors = load_file(args.calibration)
    input_ids, attention_mask = tensors["input_ids"].long(), tensors["attention_mask"].long()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    rss_loaded = _peak_rss_mb()
    embedding = model.get_input_embeddings().weight
    embedding_before = _digest(embedding)

    result: dict = {"tokens": int(attention_mask.sum())}
    prune_speed = _prune_speed()
    prune_speed.reset_peak_rss()  # loading peaks above pruning; measure floor + pruning on their own
    result["floor_seconds"] = prune_speed.forward_seconds(
        model.get_decoder(), input_ids, attention_mask, args.batch_size
    )

    import llmcompressor
    from llmcompressor import oneshot
    from torch.utils.data import DataLoader

    rows = [{"input_ids": input_ids[i], "attention_mask": attention_mask[i]} for i in range(len(input_ids))]
    # A DataLoader is passed as is (llm-compressor skips its own tokenization and sampling), so it sees
    # exactly our sequences in our order and batch size.
    loader = DataLoader(
        rows,
        batch_size=args.batch_size,
        shuffle=False,
        collate_fn=lambda batch: {k: torch.stack([b[k] for b in batch]) for k in batch[0]},
    )
    modifier = _modifier(args.method, args.sparsity, args.mask_structure)
    start = time.perf_counter()
    model = oneshot(model=model, recipe=modifier, dataset=loader)
    result["seconds"] = time.perf_counter() - start
    result["ratio_to_floor"] = result["seconds"] / result["floor_seconds"]
    result["load_average_1min"] = os.getloadavg()[0]
    result["peak_rss_mb"] = _peak_rss_mb()
    result["peak_rss_after_load_mb"] = prune_speed.peak_rss_mb()
    result["rss_after_load_mb"] = rss_loaded

    # What it pruned: every Linear of the decoder (lm_head ignored, embeddings never touched).
    linear = {
        f"{name}.weight": module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    zeros = sum(int((w == 0).sum()) for w in linear.values())
    total = sum(w.numel() for w in linear.values())
    result["achieved_sparsity"] = zeros / total
    result["pruned_modules"] = len(linear)
    result["embedding_unchanged"] = _digest(model.get_input_embeddings().weight) == embedding_before
    tmp = Path(args.output).with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in linear.items()}, str(tmp))
    os.replace(tmp, args.output)  # a killed run never leaves a file that looks finished
    result["versions"] = {
        "llmcompressor": llmcompressor.__version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": sys.version.split()[0],
    }
    result["modifier"] = repr(modifier)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
