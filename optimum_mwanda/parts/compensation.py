"""Mean-shift compensation: a closed-form update of the kept weights after a Wanda-style mask.

Masking a row ``w`` removes ``sum_{j in P} w_j x_j`` from its output. Wanda leaves that error alone; its
largest systematic part is the *expected* removed contribution, which differs between languages because
their mean activations differ. Model the input of language ``l`` (token share ``pi_l``) as its mean
``mu_l`` plus noise that is independent across features with variance ``v_j``. The expected squared output
error of the row after adding ``delta`` to the kept weights ``K`` is

    sum_l pi_l (Delta_l - delta . mu_l)^2 + sum_{j in K} v_j delta_j^2 + const,
    Delta_l = sum_{j in P} w_j mu_lj,

a ridge regression with the closed form ``delta = V^-1 M^T (M V^-1 M^T + Pi^-1)^-1 Delta`` (``M`` the
``L x |K|`` means of the kept features). Only an ``L x L`` system per row is solved, so the update costs
about as much as ``L^2`` extra calibration tokens; the pruned positions stay exactly zero, so unstructured
and ``N:M`` sparsity are kept.

With one "language" (pooled means) this is plain mean-shift compensation; with per-language means it
restores the row's mean output in every calibration language at once.
"""

from __future__ import annotations

import torch

# Features whose within-language variance is (numerically) zero would be free to absorb any correction;
# their variance is floored at this fraction of the mean variance so the update stays bounded.
_VARIANCE_FLOOR = 1e-6


def mean_shift_compensation(
    weight: torch.Tensor,
    mask: torch.Tensor,
    language_means: torch.Tensor,
    language_second_moments: torch.Tensor,
    language_shares: torch.Tensor,
) -> torch.Tensor:
    """Masked ``weight`` with its kept entries adjusted to restore each row's expected output per language.

    Args:
        weight: ``[out, in]`` dense weight.
        mask: ``[out, in]`` bool, ``True`` where pruned.
        language_means: ``[L, in]`` mean input per language ``mu_l``.
        language_second_moments: ``[L, in]`` mean squared input per language ``E_l[x^2]``.
        language_shares: ``[L]`` share of calibration tokens per language (non-negative, sums to 1); a
            language with share 0 (no tokens) places no constraint.

    Returns:
        float32 ``[out, in]`` weight, exactly zero where ``mask`` is ``True``.
    """
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be equal 2-D shapes"
        )
    n_lang, in_features = language_means.shape
    if language_second_moments.shape != (n_lang, in_features) or in_features != weight.shape[1]:
        raise ValueError(
            f"statistics {tuple(language_means.shape)}/{tuple(language_second_moments.shape)} do not match "
            f"weight {tuple(weight.shape)}"
        )
    if language_shares.shape != (n_lang,) or (language_shares < 0).any():
        raise ValueError(f"language_shares must be {n_lang} non-negative values")
    device = weight.device
    mu = language_means.to(device=device, dtype=torch.float32)
    shares = language_shares.to(device=device, dtype=torch.float64)
    variance = (language_second_moments.to(device=device, dtype=torch.float32) - mu * mu).clamp_min(0.0)
    pooled_variance = (variance * shares.float().unsqueeze(1)).sum(0)
    floor = _VARIANCE_FLOOR * float(pooled_variance.mean()) + 1e-12
    inv_variance = 1.0 / pooled_variance.clamp_min(floor)

    present = shares > 0
    mu, shares = mu[present], shares[present]
    n_lang = mu.shape[0]
    kept = weight.detach().float().masked_fill(mask, 0.0)
    if n_lang == 0:
        return kept
    keep = (~mask).float()
    # Delta[i, l]: the pruned weights' expected contribution to row i in language l.
    shift = (weight.detach().float() - kept) @ mu.t()
    # system[i] = M_K V^-1 M_K^T + Pi^-1, built for all rows by one matmul over the feature axis.
    basis = (mu.unsqueeze(1) * mu.unsqueeze(0) * inv_variance).reshape(n_lang * n_lang, in_features)
    system = (keep @ basis.t()).double().reshape(-1, n_lang, n_lang)
    system = system + torch.diag(1.0 / shares)
    multipliers = torch.linalg.solve(system, shift.double().unsqueeze(-1)).squeeze(-1).float()
    delta = (multipliers @ mu) * inv_variance
    return kept + delta * keep


def low_rank_compensation(
    weight: torch.Tensor, mask: torch.Tensor, factors: torch.Tensor, diagonal: torch.Tensor
) -> torch.Tensor:
    """Masked ``weight`` with its kept entries set to the best reconstruction under ``H = D + U U^T``.

    ``H`` models the (uncentred, token-averaged) second moment of the layer input: ``D = diag(diagonal)``
    plus the low-rank part ``U = factors`` (``[in, R]``). Minimising the expected squared output error of
    row ``w`` with the pruned set ``P`` fixed at zero gives ``delta_K = H_KK^-1 H_KP w_P``; with this ``H``
    the Woodbury identity makes it ``delta_K = D_K^-1 U_K (I + U_K^T D_K^-1 U_K)^-1 U_P^T w_P``: one
    ``R x R`` solve per row. With ``U`` = the share-weighted language means and ``D`` the within-language
    variance this is :func:`mean_shift_compensation`; adding the top principal directions of the
    within-language covariance to ``U`` moves it towards the full fixed-mask (OBS) reconstruction.

    Args:
        weight: ``[out, in]`` dense weight.
        mask: ``[out, in]`` bool, ``True`` where pruned.
        factors: ``[in, R]`` low-rank factor ``U``.
        diagonal: ``[in]`` positive diagonal ``D``.

    Returns:
        float32 ``[out, in]`` weight, exactly zero where ``mask`` is ``True``.
    """
    if weight.dim() != 2 or mask.shape != weight.shape:
        raise ValueError(
            f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be equal 2-D shapes"
        )
    in_features = weight.shape[1]
    if factors.dim() != 2 or factors.shape[0] != in_features or diagonal.shape != (in_features,):
        raise ValueError(
            f"factors {tuple(factors.shape)} / diagonal {tuple(diagonal.shape)} do not match weight "
            f"{tuple(weight.shape)}"
        )
    device = weight.device
    u = factors.to(device=device, dtype=torch.float32)
    inv_d = 1.0 / diagonal.to(device=device, dtype=torch.float32)
    rank = u.shape[1]
    dense = weight.detach().float()
    kept = dense.masked_fill(mask, 0.0)
    if rank == 0:
        return kept
    keep = (~mask).float()
    # s[i] = U_P^T w_P: what the pruned weights put into each low-rank direction.
    s = (dense - kept) @ u
    # G[i] = U_K^T D_K^-1 U_K for all rows at once: one matmul over the feature axis.
    outer = (u.unsqueeze(2) * u.unsqueeze(1) * inv_d.view(-1, 1, 1)).reshape(in_features, rank * rank)
    system = (keep @ outer).double().reshape(-1, rank, rank)
    system.diagonal(dim1=1, dim2=2).add_(1.0)
    multipliers = torch.linalg.solve(system, s.double().unsqueeze(-1)).squeeze(-1).float()
    delta = (multipliers @ u.t()) * inv_d
    return kept + delta * keep


def covariance_factors(
    language_means: torch.Tensor,
    language_shares: torch.Tensor,
    covariance_directions: torch.Tensor | None,
    covariance_eigenvalues: torch.Tensor | None,
    within_variance: torch.Tensor,
    damping: float = 0.0,
    diagonal_dampening: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, D)`` for :func:`low_rank_compensation` from per-language means and the top principal
    directions of the pooled within-language covariance.

    ``H = sum_l pi_l mu_l mu_l^T + C`` with ``C ~ V diag(lambda) V^T + diag(residual)``: ``U`` stacks
    ``sqrt(pi_l) mu_l`` and ``sqrt(lambda_k) v_k``; ``D`` is the within-language variance minus what the
    directions already explain, floored like :func:`mean_shift_compensation`, plus ``damping`` times the
    mean within-language variance (a ridge on the update, as SparseGPT's dampening).

    ``diagonal_dampening`` ``d`` shrinks the modelled ``H`` towards its diagonal as the sweep's
    ``H + d * diag(H)`` does (:func:`~optimum_mwanda.parts.inverse_hessian_cholesky`): ``D`` gains
    ``d * diag(D + U U^T)``, so the cross-feature part that moves the kept weights counts less against
    each input's own second moment (``0``: no shrinkage).
    """
    if not diagonal_dampening >= 0:
        raise ValueError(f"diagonal_dampening must be >= 0, got {diagonal_dampening}")
    shares = language_shares.float().clamp_min(0.0)
    columns = [(language_means.float() * shares.sqrt().unsqueeze(1)).t()]
    residual = within_variance.float().clone()
    if covariance_directions is not None and covariance_directions.shape[1]:
        lam = covariance_eigenvalues.float().clamp_min(0.0)
        directions = covariance_directions.float() * lam.sqrt().unsqueeze(0)
        columns.append(directions)
        residual = residual - directions.pow(2).sum(1)
    mean_variance = float(within_variance.float().mean())
    floor = _VARIANCE_FLOOR * mean_variance + 1e-12
    factors = torch.cat(columns, dim=1)
    diagonal = residual.clamp_min(floor)
    if diagonal_dampening:
        diagonal = diagonal + diagonal_dampening * (diagonal + factors.pow(2).sum(1))
    return factors, diagonal + damping * mean_variance
