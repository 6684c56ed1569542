"""SparseGPT (Frantar & Alistarh, 2023): OBS-style pruning with lazy blocked weight updates."""

from __future__ import annotations

import itertools

import torch

from ..configuration import NM_SELECTIONS
from .masks import lowest_k_mask, lowest_k_per_column


class CholeskyError(RuntimeError):
    """The dampened Hessian could not be factorised even after raising the dampening."""


def shrunk_hessian(
    hessian: torch.Tensor, diagonal_dampening: float, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(H + diagonal_dampening * diag(H)`` with a unit diagonal at dead inputs, ``dead``, its mean
    diagonal)``: the matrix :func:`inverse_hessian_cholesky` dampens and inverts. ``overwrite``: change a
    float32 ``hessian`` in place instead of a copy."""
    h = hessian if overwrite and hessian.dtype == torch.float32 else hessian.float().clone()
    if diagonal_dampening:
        h.diagonal().mul_(1.0 + diagonal_dampening)
    dead = torch.diagonal(h) == 0
    h.diagonal()[dead] = 1.0
    return h, dead, torch.diagonal(h).mean()


# Below this size a triangular inverse is one LAPACK solve; above, it recurses on halves (matrix products).
_TRIANGULAR_LEAF = 128
# Rows per block of the in-place reversal: temporaries of this many rows only.
_FLIP_BLOCK = 256


def invert_lower_triangular_(lower: torch.Tensor) -> torch.Tensor:
    """Replace a lower-triangular ``L`` (zeros above the diagonal) by ``L^-1``, in place, by halves:
    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``. About ``n^3 / 3`` multiply-adds at
    matrix-product speed (``torch`` exposes no LAPACK ``trtri``; a solve against the identity costs
    ``n^3 / 2`` in a slower kernel), and no temporary above ``n^2 / 4``."""
    n = lower.shape[0]
    if n <= _TRIANGULAR_LEAF:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        lower.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return lower
    k = n // 2
    invert_lower_triangular_(lower[:k, :k])
    invert_lower_triangular_(lower[k:, k:])
    below = lower[k:, :k] @ lower[:k, :k]  # B A^-1
    torch.mm(lower[k:, k:], below, out=lower[k:, :k])
    lower[k:, :k].neg_()
    return lower


def reverse_(matrix: torch.Tensor) -> torch.Tensor:
    """``P M P`` (rows and columns in reverse order) in place, a block of rows at a time."""
    n = matrix.shape[0]
    half = n // 2
    for a in range(0, half, _FLIP_BLOCK):
        b = min(a + _FLIP_BLOCK, half)
        top = matrix[a:b].flip(0, 1)
        matrix[a:b] = matrix[n - b : n - a].flip(0, 1)
        matrix[n - b : n - a] = top
    if n % 2:
        matrix[half] = matrix[half].flip(0)
    return matrix


def upper_inverse_factor(matrix: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """``(U, 0)`` with ``U`` upper triangular and ``U^T U = matrix^-1``, or ``(None, info)`` when ``matrix``
    is not positive definite.

    With ``P`` the reversal permutation and ``P matrix P = L L^T``: ``matrix^-1 = P L^-T L^-1 P = U^T U`` for
    ``U = P L^-1 P``, upper triangular with a positive diagonal, so it is the Cholesky factor SparseGPT
    computes as ``cholesky(cholesky_inverse(cholesky(matrix)), upper=True)``, from one factorisation and
    one triangular inverse instead of two factorisations and an inverse (1.6-6x faster on a 2-core CPU
    for n = 640-2048, and as accurate). One ``n x n`` buffer (the reversed copy) is factorised, inverted
    and reversed back in place: ``matrix`` plus ``1.25 n^2`` at the peak, against ``3.3 n^2`` for three
    separate results (``U`` is returned column-major).
    """
    # The reversed copy, seen column-major (its transpose: the same values, the matrix is symmetric), is
    # factorised by LAPACK in place; a row-major view would be copied first. U comes back column-major.
    work = matrix.flip(0, 1).t()
    info = torch.zeros((), dtype=torch.int32, device=matrix.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) != 0:
        return None, int(info)
    return reverse_(invert_lower_triangular_(work)), 0


def inverse_hessian_cholesky(
    hessian: torch.Tensor,
    dampening: float,
    retries: int = 3,
    diagonal_dampening: float = 0.0,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Upper Cholesky factor of ``(H' + damp * mean(diag H') * I)^-1`` with
    ``H' = H + diagonal_dampening * diag(H)``.

    ``diagonal_dampening`` shrinks the cross-feature part of ``H`` towards its diagonal (each input's
    own second moment), where the sweep reduces to Wanda's mask with no update; ``0`` is SparseGPT's
    reference. Dead inputs (zero diagonal: features never active) get a unit diagonal so that the matrix
    stays invertible; their weights are irrelevant to the output and are returned in ``dead`` for the
    caller to zero. When the factorisation fails the dampening is multiplied by 10, up to ``retries`` times.
    ``overwrite=True``: a float32 ``hessian`` is left holding the dampened matrix that was inverted (no
    ``in x in`` copy; the refinement reuses it).

    Returns ``(upper_factor, dead, dampening_used)``.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("the Hessian contains NaN or infinite values")
    if not diagonal_dampening >= 0:
        raise ValueError(f"diagonal_dampening must be >= 0, got {diagonal_dampening}")
    upper, dead, damp, _ = _dampened_inverse_factor(
        hessian, dampening, retries, diagonal_dampening, overwrite
    )
    return upper, dead, damp


def _dampened_inverse_factor(
    hessian: torch.Tensor, dampening: float, retries: int, diagonal_dampening: float, overwrite: bool
) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """:func:`inverse_hessian_cholesky` (after its checks), also returning the dampened matrix inverted."""
    h, dead, diag_mean = shrunk_hessian(hessian, diagonal_dampening, overwrite=overwrite)
    diagonal = torch.diagonal(h).clone()
    damp = dampening
    for _ in range(retries + 1):
        torch.diagonal(h).copy_(diagonal + damp * diag_mean)
        upper, _ = upper_inverse_factor(h)
        if upper is not None:
            return upper, dead, damp, h
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
    nm_selection: str = "greedy",
    refinement_steps: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` (``[out, in]``) and update the surviving weights to compensate.

    Masks are chosen adaptively per block of ``block_size`` columns from ``w^2 / [H^-1]_jj^2`` (over the
    whole block for unstructured sparsity, per group of ``M`` for N:M). ``dampening`` and
    ``diagonal_dampening`` are the ridges of :func:`inverse_hessian_cholesky`. ``nm_selection`` is how
    each ``N:M`` group is chosen (:data:`~optimum_mwanda.configuration.NM_SELECTIONS`: ``"greedy"``, the
    reference, or ``"joint"``, see :func:`nm_group_errors`); ``refinement_steps`` runs
    :func:`refine_kept_weights` on the result with the mask fixed (``0``: the reference). Returns
    ``(new_weight, mask)`` with ``new_weight`` in float32 and ``mask`` ``True`` where pruned.
    """
    (new_weight,), (mask,) = sparsegpt_prune_group(
        [weight],
        hessian,
        sparsity,
        nm,
        block_size,
        dampening,
        diagonal_dampening,
        nm_selection,
        refinement_steps,
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
    nm_selection: str = "greedy",
    refinement_steps: int = 0,
    overwrite_hessian: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """:func:`sparsegpt_prune` for several weights that read the same input (q/k/v, gate/up).

    They share the Hessian, so its inverse is factorised once and the column sweep runs once over their
    stacked rows. Each weight still gets its own adaptive mask selection, so the result is exactly that of
    pruning each weight on its own. ``overwrite_hessian=True``: a float32 ``hessian`` may be overwritten
    (it becomes the dampened matrix), which saves an ``in x in`` copy.
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
    if nm_selection not in NM_SELECTIONS:
        raise ValueError(f"nm_selection must be one of {list(NM_SELECTIONS)}, got {nm_selection!r}")
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size {block_size} must be a multiple of M={nm[1]}")
    device = weights[0].device
    # Work on W^T ([in, rows]) so that each column of W is a contiguous row: the sweep touches one per step.
    wt = torch.cat([w.detach().float() for w in weights], dim=0).t().contiguous()
    row_slices, start_row = [], 0
    for w in weights:
        row_slices.append(slice(start_row, start_row + w.shape[0]))
        start_row += w.shape[0]
    if not torch.isfinite(hessian).all():
        raise FloatingPointError("the Hessian contains NaN or infinite values")
    if not diagonal_dampening >= 0:
        raise ValueError(f"diagonal_dampening must be >= 0, got {diagonal_dampening}")
    # A copy on another device is ours to overwrite.
    owned = overwrite_hessian or hessian.device != torch.device(device)
    hinv, dead, _, damped = _dampened_inverse_factor(
        hessian.to(device), dampening, 3, diagonal_dampening, overwrite=owned
    )
    if not refinement_steps:
        del damped
    wt[dead, :] = 0.0
    mask_t = torch.zeros_like(wt, dtype=torch.bool)
    patterns = nm_patterns(*nm, device=device) if nm is not None and nm_selection == "joint" else None

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
        if patterns is not None:
            _joint_nm_sweep(block, block_mask, errors, hinv_block, patterns, nm[1])
        else:
            _greedy_sweep(block, block_mask, errors, hinv_block, diag, nm)
        block.masked_fill_(block_mask, 0.0)
        wt[start:end] = block
        mask_t[start:end] = block_mask
        # Lazy update of every later block at once.
        wt[end:].addmm_(hinv[start:end, end:].t(), errors, alpha=-1.0)

    # The inverse's factor is done: free it (its block views too) before the refinement and the results.
    del hinv, hinv_block, diag
    new_weight = wt.t()
    mask = mask_t.t()
    if refinement_steps:
        # The same dampened Hessian the sweep inverted; dead inputs stay at zero. In place: the result of
        # each row chunk replaces the sweep's.
        dense = torch.cat([w.detach().float() for w in weights], dim=0)
        refine_kept_weights(dense, new_weight, ~mask & ~dead, damped, refinement_steps, out=new_weight)
        del dense
    return [new_weight[rows].contiguous() for rows in row_slices], [
        mask[rows].contiguous() for rows in row_slices
    ]


# Columns per chunk of the greedy sweep: inside a block, each column's rank-1 update reaches only the rest of
# its chunk, and one product per chunk updates the rest of the block (the blocked sweep's lazy update, one
# level down). The same arithmetic as updating the whole block per column, in a different order; on a
# 2-core CPU it cuts the sweep's memory traffic (measured in research/results/sweep_chunk_speed.md).
_SWEEP_CHUNK = 16


def _greedy_sweep(
    block: torch.Tensor,
    block_mask: torch.Tensor,
    errors: torch.Tensor,
    hinv_block: torch.Tensor,
    diag: torch.Tensor,
    nm: tuple[int, int] | None,
) -> None:
    """SparseGPT's column-by-column sweep over one block (``[block columns, rows]``, written in place).

    Unstructured, ``block_mask`` is already chosen; at ``N:M`` each group's mask is chosen where the group
    starts, from ``w^2 / [H^-1]_jj^2`` of the columns as the sweep has updated them.
    """
    width = block.shape[0]
    n_keep, m = nm if nm is not None else (0, 1)
    chunk = max(m, _SWEEP_CHUNK // m * m)  # whole N:M groups per chunk
    for first in range(0, width, chunk):
        last = min(first + chunk, width)
        for i in range(first, last):
            if nm is not None and i % m == 0:
                group = block[i : i + m].pow(2) / diag[i : i + m].pow(2)
                block_mask[i : i + m] = lowest_k_per_column(group, m - n_keep)
            # err = (w - q) / d with q the pruned column; the update below then turns row i into q.
            err = block[i].mul(block_mask[i]).div_(diag[i])
            block[i:last].addr_(hinv_block[i, i:last], err, alpha=-1.0)
            errors[i] = err
        if last < width:
            block[last:].addmm_(hinv_block[first:last, last:].t(), errors[first:last], alpha=-1.0)


# Rows per chunk of the refinement: rows are independent, so the conjugate-gradient buffers (about nine
# ``[rows, in]`` float32 tensors) need only exist for one chunk at a time (``[1024, in] x [in, in]``
# products still run at the machine's matrix rate).
_REFINEMENT_CHUNK_ROWS = 1024


def refine_kept_weights(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    keep: torch.Tensor,
    hessian: torch.Tensor,
    steps: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lower each row's reconstruction loss ``(w - w') H (w - w')^T`` over its kept weights, the mask fixed.

    SparseGPT's sweep freezes a kept column once it has passed it, so the columns pruned later cannot move
    it: its result is not the least-squares reconstruction for the mask it chose. This runs ``steps``
    iterations of conjugate gradients on that quadratic, for every row at once (each row its own step
    sizes; preconditioned by ``diag(H)``), from ``pruned``: each step costs one ``[rows, in] x [in, in]``
    product and does not raise the loss. Written here because the rows have different kept sets (a
    batched, masked solve that neither torch nor SciPy offers); ``torch.linalg`` would need one
    ``|kept| x |kept|`` factorisation per row. Rows are processed in chunks of 1024, so the working
    buffers scale with the chunk, not with the weight.

    Args:
        dense: ``[rows, in]`` the weight before pruning.
        pruned: ``[rows, in]`` the starting point, zero where ``keep`` is ``False``.
        keep: ``[rows, in]`` bool, the entries that may change.
        hessian: ``[in, in]`` symmetric positive-definite (the dampened Hessian the sweep solved with).
        steps: iterations (``0`` returns ``pruned``).
        out: write the result there (float32 ``[rows, in]``, may be ``pruned`` itself) instead of a new
            tensor.

    Returns:
        float32 ``[rows, in]``, exactly zero where ``keep`` is ``False``.
    """
    if dense.shape != pruned.shape or keep.shape != pruned.shape or hessian.shape != (dense.shape[1],) * 2:
        raise ValueError(
            f"dense {tuple(dense.shape)}, pruned {tuple(pruned.shape)}, keep {tuple(keep.shape)} and "
            f"hessian {tuple(hessian.shape)} do not match"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if out is None:
        out = torch.empty(pruned.shape, dtype=torch.float32, device=pruned.device)
    h = hessian.float()
    inv_diag = 1.0 / torch.diagonal(h).clamp_min(torch.finfo(torch.float32).tiny)
    chunk = _REFINEMENT_CHUNK_ROWS
    for start in range(0, dense.shape[0], chunk):
        rows = slice(start, start + chunk)
        out[rows] = _refine_rows(dense[rows], pruned[rows], keep[rows], h, inv_diag, steps)
    return out


def _refine_rows(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    keep: torch.Tensor,
    h: torch.Tensor,
    inv_diag: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """:func:`refine_kept_weights` on one chunk of rows.

    The ``[rows, in] x [in, in]`` product is most of a step; the rest reuses three ``[rows, in]`` buffers
    (fused ``addcmul_`` updates, products written with ``out=``) instead of allocating a temporary per
    operation, which took about a tenth off the refinement on a 2-core CPU."""
    x = pruned.float().masked_fill(~keep, 0.0)
    if steps == 0:
        return x
    kept = keep.float()
    # minus the gradient, over the kept entries only
    residual = torch.mm(torch.sub(dense.float(), x), h).mul_(kept)
    direction = residual * inv_diag
    product = torch.empty_like(x)
    scratch = torch.empty_like(x)
    rz = _row_dots(residual, direction, scratch)
    for _ in range(steps):
        torch.mm(direction, h, out=product).mul_(kept)
        curvature = _row_dots(direction, product, scratch)
        # A converged row (zero residual, zero direction) takes no step instead of 0 / 0.
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(1e-30), torch.zeros_like(rz))
        x.addcmul_(direction, alpha)
        residual.addcmul_(product, alpha, value=-1.0)
        preconditioned = torch.mul(residual, inv_diag, out=product)  # the product is used up
        rz_next = _row_dots(residual, preconditioned, scratch)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-30), torch.zeros_like(rz))
        # The next direction goes into the product's buffer; the old direction's is the next product's.
        direction, product = preconditioned.addcmul_(direction, beta), direction
        rz = rz_next
    return x.masked_fill_(~keep, 0.0)


def _row_dots(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``[rows, 1]`` dot products of the rows of ``a`` and ``b``, through a preallocated ``scratch``."""
    return torch.mul(a, b, out=scratch).sum(dim=1, keepdim=True)


def nm_patterns(n: int, m: int, device: torch.device | None = None) -> torch.Tensor:
    """Every way to prune ``m - n`` of ``m`` positions, as ``[C(m, m - n), m - n]`` ascending positions."""
    combos = list(itertools.combinations(range(m), m - n))
    return torch.tensor(combos, dtype=torch.long, device=device).view(len(combos), m - n)


def nm_group_errors(weights: torch.Tensor, hinv_upper: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    """The sweep's scaled errors for every pruning pattern of one ``N:M`` group.

    ``weights`` is the group's ``[m, rows]`` slice of ``W^T`` as the sweep reaches it, ``hinv_upper`` the
    ``[m, m]`` diagonal block of the upper Cholesky factor ``U`` of ``H^-1`` and ``patterns`` the pruned
    positions of :func:`nm_patterns`. Pruning column ``j`` (in order) leaves the error
    ``e_j = w'_j / U_jj`` and moves every later column ``k`` by ``-U_jk e_j``, so only the pruned columns'
    errors interact: ``e_t = (w_t - sum_{s < t} U_st e_s) / U_tt`` over the pattern's positions. The row's
    OBS loss from the group is ``sum_t e_t^2``. Returns ``e`` as ``[patterns, m - n, rows]``, in the order
    of ``patterns``' positions.
    """
    w = weights[patterns]  # [P, k, rows]
    u = hinv_upper[patterns.unsqueeze(2), patterns.unsqueeze(1)]  # [P, k, k]: U between pruned positions
    errors: list[torch.Tensor] = []
    for t in range(patterns.shape[1]):
        err = w[:, t]
        for s, earlier in enumerate(errors):
            err = err - u[:, s, t, None] * earlier
        errors.append(err / u[:, t, t, None])
    return torch.stack(errors, dim=1)


def _joint_nm_sweep(
    block: torch.Tensor,
    block_mask: torch.Tensor,
    errors: torch.Tensor,
    hinv_block: torch.Tensor,
    patterns: torch.Tensor,
    m: int,
) -> None:
    """The sweep over one block, choosing each group's pattern by the group's total OBS loss.

    SparseGPT's greedy choice ranks the ``m`` columns by ``w_j^2 / U_jj^2`` where the group starts; the
    true loss of pruning a set also depends on how pruning an earlier column moves the later ones (the
    ``U_jk`` inside the group), which the greedy choice ignores. Here every pattern's loss is evaluated
    (6 for 2:4, 70 for 4:8) and the lowest is taken per row (ties: the first pattern, in
    :func:`nm_patterns`' order); the group's errors then update the rest of the block with one product
    instead of ``m``. ``block``, ``block_mask`` and ``errors`` (``[block columns, rows]``) are written in
    place, as by the greedy loop.
    """
    for i in range(0, block.shape[0], m):
        group_errors = nm_group_errors(block[i : i + m], hinv_block[i : i + m, i : i + m], patterns)
        choice = group_errors.pow(2).sum(dim=1).argmin(dim=0)  # [rows]
        positions = patterns[choice].t()  # [k, rows]
        chosen = group_errors.gather(0, choice.view(1, 1, -1).expand(1, *group_errors.shape[1:]))[0]
        group = torch.zeros_like(block[i : i + m]).scatter_(0, positions, chosen)
        block_mask[i : i + m] = torch.zeros_like(block_mask[i : i + m]).scatter_(0, positions, True)
        errors[i : i + m] = group
        block[i:].addmm_(hinv_block[i : i + m, i:].t(), group, alpha=-1.0)
