"""One decoder layer of Gemma 3 270M: what each lever on the sweep's cost saves, and what it costs in error.

The dense model's inputs to one layer's four shared-input groups (q/k/v, o, gate/up, down) are captured on
the study's calibration budget (7 languages x 8 x 512 tokens, seed 0). For default M-Wanda's sweep (70%
and 2:4: every 4th token, ``H + 0.3 diag(H)``, 5 refinement steps) this times, per layer:

- the Hessian's accumulation: float64 sum of one product per sequence, of one product per group of 7
  sequences (``sequence_group_for(56)``, the default since issue 27) or ``statistics_dtype=float32``;
- the inverse's upper Cholesky factor: SparseGPT's ``cholesky -> cholesky_inverse -> cholesky`` or one
  factorisation of the reversed matrix and a blocked triangular inverse (``upper_inverse_factor``);
- the column sweep, and the refinement per conjugate-gradient step;
- a token sample sized per input (every 8th token where ``in`` < 2048), scored but not timed;

and scores each variant by the layer's relative output error ``sum_g tr(D_g H_g D_g^T) / tr(W_g H_g W_g^T)``
under the every-token calibration Hessian ``H_g`` of each group (``D = W - W'``): not a perplexity, a quick
layer-level proxy for what the study measures end to end.

Usage (the committed output came from exactly this)::

    python research/sweep_levers_layer.py --layer 6 --threads 2 > research/results/sweep_levers_layer.md
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from optimum_mwanda.calibration import default_calibration
from optimum_mwanda.demo import load_demo_model
from optimum_mwanda.parts import HessianStatistics, sparsegpt_prune_group
from optimum_mwanda.parts.sparsegpt import refine_kept_weights, shrunk_hessian, upper_inverse_factor
from optimum_mwanda.parts.statistics import sequence_group_for

CALIBRATION = ["ar", "de", "en", "es", "ru", "sw", "zh"]
STRIDE, SHRINKAGE, DAMPENING = 4, 0.3, 0.01
GROUPS = {
    "qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "o": ["self_attn.o_proj"],
    "gate_up": ["mlp.gate_proj", "mlp.up_proj"],
    "down": ["mlp.down_proj"],
}


def _capture(model, layer, batches) -> dict[str, torch.Tensor]:
    store: dict[str, list[torch.Tensor]] = {name: [] for name in GROUPS}
    hooks = [
        layer.get_submodule(names[0]).register_forward_pre_hook(
            lambda _m, args, name=name: store[name].append(args[0].detach().float().clone())
        )
        for name, names in GROUPS.items()
    ]
    with torch.no_grad():
        for batch in batches:
            model.model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts) for name, parts in store.items()}  # [sequences, seq_len, in]


def capture_study_layer(index: int):
    """``(layer, calibration, inputs)``: the demo model's decoder layer ``index``, the study's calibration
    (7 languages x 8 x 512 tokens, seed 0) and each group's captured dense inputs ``[sequences, seq_len, in]``."""
    model, tokenizer = load_demo_model()
    model.eval()
    calibration = default_calibration(tokenizer, languages=CALIBRATION, samples_per_language=8, seed=0)
    layer = model.model.layers[index]
    ids, mask = calibration.input_ids, calibration.attention_mask
    batches = [
        {"input_ids": ids[i : i + 4], "attention_mask": mask[i : i + 4]} for i in range(0, len(ids), 4)
    ]
    return layer, calibration, _capture(model, layer, batches)


def _old_factor(h: torch.Tensor) -> torch.Tensor:
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layer, calibration, inputs = capture_study_layer(args.layer)
    ids = calibration.input_ids
    language = calibration.language_index.repeat_interleave(ids.shape[1])
    seq_len = ids.shape[1]
    print(f"# Sweep levers on one layer of Gemma 3 270M (layer {args.layer})\n")
    print(
        f"{len(ids)} x {seq_len} tokens, {args.threads} threads, torch {torch.__version__}; "
        f"load average before {os.getloadavg()[0]:.2f}\n"
    )
    seconds: dict[str, float] = {}
    errors: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        seconds[key] = seconds.get(key, 0.0) + value

    for structure, sparsity, nm in (("70%", 0.7, None), ("2:4", 0.5, (2, 4))):
        numerators: dict[str, float] = {}
        denominator = 0.0
        for group, names in GROUPS.items():
            x = inputs[group]
            flat = x.reshape(-1, x.shape[-1])
            exact = (flat.double().t() @ flat.double()).div_(flat.shape[0])
            weights = [layer.get_submodule(n).weight.detach().float() for n in names]
            dense = torch.cat(weights)
            denominator += float(torch.einsum("ri,ij,rj->", dense.double(), exact, dense.double()))
            hessians = {}
            for key, dtype, group_size in (
                ("float64", torch.float64, 1),
                ("float32", torch.float32, 1),
                ("grouped", torch.float64, sequence_group_for(len(ids))),
            ):
                statistic = HessianStatistics(
                    x.shape[-1], len(CALIBRATION), token_stride=STRIDE, dtype=dtype, sequence_group=group_size
                )
                start = time.perf_counter()
                for i in range(0, len(x), 4):
                    part = x[i : i + 4].reshape(-1, x.shape[-1])
                    statistic.update(part, language[i * seq_len : (i + 4) * seq_len], seq_len)
                hessians[key] = statistic.release_hessian()
                if structure == "70%":
                    what = f"float64, one product per {group_size} sequences" if key == "grouped" else key
                    add(f"Hessian accumulation, {what}", time.perf_counter() - start)
            # A sample sized per input: every 8th token for the narrow inputs (q/k/v, gate/up at 640, o at
            # 1024: still 4.4-11 tokens per input), every 4th for down (2048: 3.5 per input).
            sized = HessianStatistics(
                x.shape[-1], len(CALIBRATION), token_stride=8 if x.shape[-1] < 2048 else STRIDE
            )
            for i in range(0, len(x), 4):
                sized.update(
                    x[i : i + 4].reshape(-1, x.shape[-1]), language[i * seq_len : (i + 4) * seq_len], seq_len
                )
            hessians["sized"] = sized.release_hessian()
            h = hessians["float64"]
            shrunk, _, mean = shrunk_hessian(h, SHRINKAGE)
            shrunk.diagonal().add_(DAMPENING * mean)
            if structure == "70%":
                add("inverse factor, cholesky + cholesky_inverse + cholesky", _timed(_old_factor, shrunk)[1])
                add(
                    "inverse factor, reversed cholesky + blocked triangular inverse",
                    _timed(upper_inverse_factor, shrunk)[1],
                )
            variants = {}
            for name, hessian in (
                ("float64 sum", h),
                ("float32 sum", hessians["float32"]),
                ("float64 sum of sequence groups", hessians["grouped"]),
                ("stride 8 below in=2048", hessians["sized"]),
            ):
                (swept, masks), t = _timed(
                    sparsegpt_prune_group, weights, hessian.clone(), sparsity, nm, 128, DAMPENING, SHRINKAGE
                )
                if name == "float64 sum":
                    add(f"{structure}: sweep (inverse factor included)", t)
                start = torch.cat(swept)
                keep = ~torch.cat(masks)
                variants[f"{name}, 0 steps"] = start
                if name != "float64 sum":
                    own, _, own_mean = shrunk_hessian(hessian, SHRINKAGE)  # the refinement's own H
                    own.diagonal().add_(DAMPENING * own_mean)
                    variants[f"{name}, 5 steps"] = refine_kept_weights(dense, start, keep, own, 5)
                    continue
                one, t1 = _timed(refine_kept_weights, dense, start, keep, shrunk, 1)
                five, t5 = _timed(refine_kept_weights, dense, start, keep, shrunk, 5)
                add(f"{structure}: refinement, 5 steps", t5)
                add(f"{structure}: refinement, each step after the first", (t5 - t1) / 4)
                variants[f"{name}, 1 step"], variants[f"{name}, 5 steps"] = one, five
                for steps in (2, 3):
                    variants[f"{name}, {steps} steps"] = refine_kept_weights(
                        dense, start, keep, shrunk, steps
                    )
            for variant, new in variants.items():
                delta = (dense - new).double()
                numerators[variant] = numerators.get(variant, 0.0) + float(
                    torch.einsum("ri,ij,rj->", delta, exact, delta)
                )
        for variant, value in numerators.items():
            if not variant.startswith("float64 sum,") and "5 steps" not in variant:
                continue
            errors[f"{structure}: {variant}"] = value / denominator

    print("## Seconds per layer (four groups)\n")
    print("| step | seconds |\n|---|---:|")
    for key, value in seconds.items():
        print(f"| {key} | {value:.3f} |")
    print("\n## Relative output error of the layer (every-token Hessian)\n")
    print("| sparsity: variant | error |\n|---|---:|")
    for key, value in errors.items():
        print(f"| {key} | {value:.5f} |")
    print(f"\nLoad average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
