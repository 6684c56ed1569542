"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with lazy blocked weight updates."""

from __future__ import annotations

import torch


class CholeskyError(RuntimeError):
    """The dampened Hessian could not be factorised even after raising the dampening."""


def inverse_hessian_cholesky(
    hessian: torch.Tensor, dampening: float, retries: int = 3
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``.

    Dead inputs (zero diagonal: features never active) get a unit diagonal so that the matrix stays
    invertible; their weights are irrelevant to the output and are returned in ``dead`` for the caller to
    zero. When the factorisation fails the dampening is multiplied by 10, up to ``retries`` times.

    Returns ``(upper_factor, dead, dampening_used)``.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("the Hessian contains NaN or infinite values")
    h = hessian.double().clone()
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
                return upper.float(), dead, damp
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (``[out, in]``) and update the surviving weights to compensate.

    Masks are chosen adaptively per block of ``block_size`` columns from ``w^2 / [H^-1]_jj^2`` (over the
    whole block for unstructured sparsity, per group of ``M`` for N:M). Returns ``(new_weight, mask)`` with
    ``new_weight`` in float32 and ``mask`` ``True`` where pruned.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    rows, cols = weight.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(f"N:M with M={nm[1]} needs in_features divisible by {nm[1]}, got {cols}")
    w = weight.detach().float().contiguous().clone()
    hinv, dead, _ = inverse_hessian_cholesky(hessian.to(w.device), dampening)
    w[:, dead] = 0.0
    mask = torch.zeros_like(w, dtype=torch.bool)

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        count = end - start
        w_block = w[:, start:end].clone()
        quantised = torch.zeros_like(w_block)
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        diag = torch.diagonal(hinv_block)

        if nm is None:
            saliency = w_block.pow(2) / diag.pow(2).unsqueeze(0)
            n_pruned = int(saliency.numel() * sparsity)
            block_mask = torch.zeros(rows, count, dtype=torch.bool, device=w.device)
            if n_pruned:
                order = torch.sort(saliency.flatten(), stable=True).indices[:n_pruned]
                block_mask.view(-1)[order] = True
        else:
            block_mask = torch.zeros(rows, count, dtype=torch.bool, device=w.device)

        for i in range(count):
            column = w_block[:, i]
            d = diag[i]
            if nm is not None and i % nm[1] == 0:
                n_keep, m = nm
                group = w_block[:, i : i + m].pow(2) / diag[i : i + m].pow(2).unsqueeze(0)
                drop = torch.sort(group, dim=1, stable=True).indices[:, : m - n_keep]
                block_mask[:, i : i + m].scatter_(1, drop, True)
            q = column.masked_fill(block_mask[:, i], 0.0)
            quantised[:, i] = q
            err = (column - q) / d
            # OBS update of the not-yet-processed columns of this block.
            w_block[:, i:] -= err.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = err

        w[:, start:end] = quantised
        mask[:, start:end] = block_mask
        # Lazy update of every later block at once.
        w[:, end:] -= errors @ hinv[start:end, end:]

    w[mask] = 0.0
    return w, mask
