"""One decoder layer of Gemma 3 270M: the 2:4 sweep's variants, scored by the output error they leave.

The dense model's inputs to one layer's ``mlp.gate_proj`` and ``mlp.down_proj`` are captured on the study's
calibration languages (7 x 4 x 512 tokens) and on held-out text of calibration (en de sw) and absent (fr tr
vi) languages (1024 tokens each). Each variant prunes the weight at 2:4; the table gives the relative output
error ``tr(D H D^T) / tr(W H W^T)`` (``D = W - W'``) under each text's second moment ``H``:

- ``sparsegpt``: SparseGPT's reference sweep on every calibration token;
- ``greedy`` / ``joint``: M-Wanda's sweep (every 4th token, ``H + 0.1 diag(H)``) with SparseGPT's greedy
  N:M choice or ``nm_selection="joint"``;
- ``+cgK``: then ``K`` steps of :func:`optimum_mwanda.parts.refine_kept_weights` (``refinement_steps``).

Not a perplexity: a quick, layer-level view of what the study measures end to end (docs/research/2026-12-mwanda-rounds.md, round 7).

Usage (the committed output came from exactly this)::

    python research/sweep_refinement_layer.py --layer 6 > research/results/sweep_refinement_layer.md
"""

from __future__ import annotations

import argparse
import os

import torch

from optimum_mwanda.calibration import default_calibration, load_bundled_corpus
from optimum_mwanda.demo import load_demo_model
from optimum_mwanda.parts import sparsegpt_prune_group
from optimum_mwanda.parts.sparsegpt import refine_kept_weights

CALIBRATION = ["ar", "de", "en", "es", "ru", "sw", "zh"]
HELDOUT = ["en", "de", "sw", "fr", "tr", "vi"]
STRIDE, SHRINKAGE, DAMPENING = 4, 0.1, 0.01


def shrunk_hessian(hessian: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``H + shrinkage * diag(H)`` with a unit diagonal at dead inputs, and its mean diagonal: what the
    sweep dampens and inverts (written out here rather than borrowed from the package's private helper)."""
    h = hessian.float().clone()
    h.diagonal().mul_(1.0 + shrinkage)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    return h, torch.diagonal(h).mean()


def _capture(model, modules, batches):
    store = {name: [] for name in modules}
    hooks = [
        module.register_forward_pre_hook(
            lambda _m, args, name=name: store[name].append(args[0].detach().reshape(-1, args[0].shape[-1]))
        )
        for name, module in modules.items()
    ]
    with torch.no_grad():
        for batch in batches:
            model.model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(parts).float() for name, parts in store.items()}


def _second_moment(x: torch.Tensor) -> torch.Tensor:
    return x.double().t() @ x.double() / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_demo_model()
    model.eval()
    calibration = default_calibration(tokenizer, languages=CALIBRATION, samples_per_language=4, seed=0)
    layer = model.model.layers[args.layer]
    modules = {"gate_proj": layer.mlp.gate_proj, "down_proj": layer.mlp.down_proj}
    batches = [
        {
            "input_ids": calibration.input_ids[i : i + 4],
            "attention_mask": calibration.attention_mask[i : i + 4],
        }
        for i in range(0, calibration.input_ids.shape[0], 4)
    ]
    calibration_inputs = _capture(model, modules, batches)
    heldout = load_bundled_corpus("heldout", languages=HELDOUT)
    texts = {
        language: _capture(
            model,
            modules,
            [{"input_ids": tokenizer("\n\n".join(t), return_tensors="pt").input_ids[:, :1024]}],
        )
        for language, t in heldout.items()
    }
    seq_len = calibration.input_ids.shape[1]
    print(f"Gemma 3 270M, layer {args.layer}, 2:4; load average {os.getloadavg()[0]:.1f}")
    for name, module in modules.items():
        weight = module.weight.detach().float()
        x = calibration_inputs[name]
        sampled = x.view(-1, seq_len, x.shape[1])[:, ::STRIDE].reshape(-1, x.shape[1])
        full_h, sampled_h = (2 * _second_moment(x)).float(), (2 * _second_moment(sampled)).float()
        variants = {"sparsegpt": sparsegpt_prune_group([weight], full_h, 0.5, nm=(2, 4))[0][0]}
        for selection in ("greedy", "joint"):
            variants[selection] = sparsegpt_prune_group(
                [weight], sampled_h, 0.5, nm=(2, 4), diagonal_dampening=SHRINKAGE, nm_selection=selection
            )[0][0]
        # The matrix the refinement runs on inside the sweep: shrunk, then dampened.
        damped, diag_mean = shrunk_hessian(sampled_h, SHRINKAGE)
        damped.diagonal().add_(DAMPENING * diag_mean)
        for base, steps in (("greedy", 2), ("greedy", 5), ("greedy", 20), ("joint", 5)):
            start = variants[base]
            variants[f"{base}+cg{steps}"] = refine_kept_weights(weight, start, start != 0, damped, steps)
        scores = {
            "calibration": full_h.double(),
            **{lang: _second_moment(t[name]) for lang, t in texts.items()},
        }
        print(f"\n{name} {tuple(weight.shape)}: relative output error")
        print(f"| variant | {' | '.join(scores)} |")
        print(f"|---|{'---:|' * len(scores)}")
        for variant, new in variants.items():
            delta, dense = (weight - new).double(), weight.double()
            errors = [
                float(
                    torch.einsum("ri,ij,rj->", delta, h, delta) / torch.einsum("ri,ij,rj->", dense, h, dense)
                )
                for h in scores.values()
            ]
            print(f"| {variant} | {' | '.join(f'{e:.4f}' for e in errors)} |")


if __name__ == "__main__":
    main()
