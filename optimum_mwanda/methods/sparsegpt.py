"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with lazy blocked weight updates."""

from __future__ import annotations

import torch

from .masks import lowest_k_mask, lowest_k_per_column


class CholeskyError(RuntimeError):
    """The dampened Hessian could not be factorised even after raising the dampening."""


def inverse_hessian_cholesky(
    hessian: torch.Tensor, dampening: float, retries: int = 3, diagonal_dampening: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor of ``(H' + damp * mean(diag H') * I)^-1`` with
    ``H' = H + diagonal_dampening * diag(H)``.

    ``diagonal_dampening`` shrinks the cross-feature part of ``H`` towards its diagonal (each input's
    own second moment), where the sweep reduces to Wanda's mask with no update; ``0`` is SparseGPT's
    reference. Dead inputs (zero diagonal: features never active) get a unit diagonal so that the matrix
    stays invertible; their weights are irrelevant to the output and are returned in ``dead`` for the
    caller to zero. When the factorisation fails the dampening is multiplied by 10, up to ``retries`` times.

    Returns ``(upper_factor, dead, dampening_used)``.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("the Hessian contains NaN or infinite values")
    if not diagonal_dampening >= 0:
        raise ValueError(f"diagonal_dampening must be >= 0, got {diagonal_dampening}")
    h = hessian.float().clone()
    if diagonal_dampening:
        h.diagonal().mul_(1.0 + diagonal_dampening)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag_mean = torch.diagonal(h).mean()
    damp = dampening
    for _ in range(retries + 1):
        damped = h.clone()
        damped.diagonal().add_(damp * diag_mean)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper, dead, damp
        damp *= 10.0
    raise CholeskyError(
        f"the Hessian is not positive definite even with dampening {damp / 10:g}: the calibration "
        "activations are degenerate for this module (too few tokens or constant inputs); add calibration "
        "data or raise SparseGPTConfig.dampening"
    )


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    diagonal_dampening: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (``[out, in]``) and update the surviving weights to compensate.

    Masks are chosen adaptively per block of ``block_size`` columns from ``w^2 / [H^-1]_jj^2`` (over the
    whole block for unstructured sparsity, per group of ``M`` for N:M). ``dampening`` and
    ``diagonal_dampening`` are the ridges of :func:`inverse_hessian_cholesky`. Returns
    ``(new_weight, mask)`` with ``new_weight`` in float32 and ``mask`` ``True`` where pruned.
    """
    (new_weight,), (mask,) = sparsegpt_prune_group(
        [weight], hessian, sparsity, nm, block_size, dampening, diagonal_dampening
    )
    return new_weight, mask


def sparsegpt_prune_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    dampening: float = 0.01,
    diagonal_dampening: float = 0.0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`sparsegpt_prune` for several weights that read the same input (q/k/v, gate/up).

    They share the Hessian, so its inverse is factorised once and the column sweep runs once over their
    stacked rows. Each weight still gets its own adaptive mask selection, so the result is exactly that of
    pruning each weight on its own.
    """
    cols = hessian.shape[0]
    if (
        hessian.dim() != 2
        or hessian.shape[1] != cols
        or any(w.dim() != 2 or w.shape[1] != cols for w in weights)
    ):
        raise ValueError(
            f"weights {[tuple(w.shape) for w in weights]} and Hessian {tuple(hessian.shape)} do not match"
        )
    if nm is not None and cols % nm[1]:
        raise ValueError(f"N:M with M={nm[1]} needs in_features divisible by {nm[1]}, got {cols}")
    device = weights[0].device
    # Work on W^T ([in, rows]) so that each column of W is a contiguous row: the sweep touches one per step.
    wt = torch.cat([w.detach().float() for w in weights], dim=0).t().contiguous()
    row_slices, start_row = [], 0
    for w in weights:
        row_slices.append(slice(start_row, start_row + w.shape[0]))
        start_row += w.shape[0]
    hinv, dead, _ = inverse_hessian_cholesky(
        hessian.to(device), dampening, diagonal_dampening=diagonal_dampening
    )
    wt[dead, :] = 0.0
    mask_t = torch.zeros_like(wt, dtype=torch.bool)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = wt[start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = torch.diagonal(hinv_block).unsqueeze(1)
        block_mask = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            saliency = block.pow(2) / diag.pow(2)
            for rows in row_slices:
                part = saliency[:, rows]
                # One adaptive selection over the whole block of this weight (column-major order
                # matches W's row-major order for tie-breaking).
                flat = part.t().reshape(1, -1)
                chosen = lowest_k_mask(flat, int(flat.numel() * sparsity))
                block_mask[:, rows] = chosen.view(part.shape[1], part.shape[0]).t()
        errors = torch.empty_like(block)
        n_keep, m = nm if nm is not None else (0, 0)
        for i in range(end - start):
            if nm is not None and i % m == 0:
                group = block[i : i + m].pow(2) / diag[i : i + m].pow(2)
                block_mask[i : i + m] = lowest_k_per_column(group, m - n_keep)
            # err = (w - q) / d with q the pruned column; the update below then turns row i into q itself.
            err = block[i].mul(block_mask[i]).div_(diag[i])
            block[i:].addr_(hinv_block[i, i:], err, alpha=-1.0)
            errors[i] = err
        block.masked_fill_(block_mask, 0.0)
        wt[start:end] = block
        mask_t[start:end] = block_mask
        # Lazy update of every later block at once.
        wt[end:].addmm_(hinv[start:end, end:].t(), errors, alpha=-1.0)

    new_weight = wt.t()
    mask = mask_t.t()
    return [new_weight[rows].contiguous() for rows in row_slices], [
        mask[rows].contiguous() for rows in row_slices
    ]
