"""One decoder layer of Gemma 3 270M: could a better preconditioner buy the refinement's 5 steps with fewer?

The sweep's refinement (``parts.sparsegpt.refine_kept_weights``) runs conjugate gradients on each row's
reconstruction loss over its kept weights, preconditioned by ``diag(H)`` (Jacobi); each step costs one
``[rows, in] x [in, in]`` product. This scores, on the same captured layer and sweep result as
``research/sweep_levers_layer.py`` (default M-Wanda at 70% and 2:4), the layer's relative output error
after k steps of the same iteration with three preconditioners restricted to the kept weights:

- Jacobi, ``diag(H)^-1`` (the default);
- block Jacobi, the inverses of ``H``'s 128 x 128 diagonal blocks (about ``128 / in`` of a product a step);
- ``H^-1`` from the sweep's factor (``U^T U``: two triangular products a step, as much as the product).

Usage (the committed output came from exactly this)::

    python research/refinement_preconditioners.py --layer 6 > research/results/refinement_preconditioners.md
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from sweep_levers_layer import DAMPENING, GROUPS, SHRINKAGE, STRIDE, capture_study_layer

from optimum_mwanda.parts import HessianStatistics, sparsegpt_prune_group
from optimum_mwanda.parts.sparsegpt import shrunk_hessian, upper_inverse_factor

BLOCK = 128


def preconditioned_cg(
    dense: torch.Tensor,
    start: torch.Tensor,
    keep: torch.Tensor,
    h: torch.Tensor,
    steps: int,
    precondition: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``steps`` of row-wise conjugate gradients on ``(w - x) H (w - x)^T`` over the kept entries."""
    kept = keep.float()
    x = start.masked_fill(~keep, 0.0)
    residual = ((dense - x) @ h) * kept
    z = precondition(residual) * kept
    direction, rz = z.clone(), (residual * z).sum(1, keepdim=True)
    for _ in range(steps):
        product = (direction @ h) * kept
        curvature = (direction * product).sum(1, keepdim=True)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        x = x + alpha * direction
        residual = residual - alpha * product
        z = precondition(residual) * kept
        rz_next = (residual * z).sum(1, keepdim=True)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))
        direction, rz = z + beta * direction, rz_next
    return x.masked_fill(~keep, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layer, calibration, inputs = capture_study_layer(args.layer)
    ids = calibration.input_ids
    print(f"# Refinement preconditioners on one layer of Gemma 3 270M (layer {args.layer})\n")
    print(
        f"{len(ids)} x {ids.shape[1]} tokens; relative output error of the layer under the every-token "
        f"Hessian (as in sweep_levers_layer.md); load average before {os.getloadavg()[0]:.2f}\n"
    )
    print(
        "| structure | preconditioner | 0 steps | 1 | 2 | 3 | 4 | 5 |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    for structure, sparsity, nm in (("70%", 0.7, None), ("2:4", 0.5, (2, 4))):
        numerators: dict[tuple[str, int], float] = {}
        denominator = 0.0
        for group, names in GROUPS.items():
            x = inputs[group]
            flat = x.reshape(-1, x.shape[-1])
            exact = (flat.double().t() @ flat.double()) / flat.shape[0]
            weights = [layer.get_submodule(n).weight.detach().float() for n in names]
            dense = torch.cat(weights)
            denominator += float(torch.einsum("ri,ij,rj->", dense.double(), exact, dense.double()))
            statistic = HessianStatistics(x.shape[-1], 1, token_stride=STRIDE)
            statistic.update(flat, torch.zeros(flat.shape[0], dtype=torch.long), x.shape[1])
            h = statistic.release_hessian()
            shrunk, _, mean = shrunk_hessian(h, SHRINKAGE)
            shrunk.diagonal().add_(DAMPENING * mean)
            swept, masks = sparsegpt_prune_group(weights, h.clone(), sparsity, nm, 128, DAMPENING, SHRINKAGE)
            start, keep = torch.cat(swept), ~torch.cat(masks)
            n = shrunk.shape[0]
            inv_diag = 1.0 / shrunk.diagonal()
            blocks = torch.stack(
                [torch.linalg.inv(shrunk[i : i + BLOCK, i : i + BLOCK]) for i in range(0, n, BLOCK)]
            )
            upper, _ = upper_inverse_factor(shrunk.clone())
            inverse = upper.t() @ upper
            preconditioners = {
                "Jacobi (default)": lambda r, d=inv_diag: r * d,
                f"block Jacobi ({BLOCK})": lambda r, b=blocks: torch.einsum(
                    "rkb,kbc->rkc", r.view(r.shape[0], -1, BLOCK), b
                ).reshape(r.shape),
                "H^-1 (two triangular products)": lambda r, inv=inverse: r @ inv,
            }
            for name, precondition in preconditioners.items():
                for steps in range(6):
                    new = preconditioned_cg(dense, start, keep, shrunk, steps, precondition)
                    delta = (dense - new).double()
                    numerators[name, steps] = numerators.get((name, steps), 0.0) + float(
                        torch.einsum("ri,ij,rj->", delta, exact, delta)
                    )
        for name in preconditioners:
            row = " | ".join(f"{numerators[name, s] / denominator:.5f}" for s in range(6))
            print(f"| {structure} | {name} | {row} |")
    print(f"\nLoad average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
