"""The pure maths: masks, scores, SparseGPT, schedules, statistics."""

import itertools
import math

import pytest
import torch

from optimum_mwanda.parts import (
    CholeskyError,
    FeatureStatistics,
    HessianStatistics,
    cross_lingual_correlation,
    cwl_schedule,
    depth_schedule,
    hessian_token_stride_for,
    mask_from_scores,
    mwanda_feature_importance,
    negative_feature_factor,
    nm_mask,
    outlier_ratio,
    owl_schedule,
    per_row_mask,
    schedule_from_signal,
    sparsegpt_prune,
    sparsegpt_prune_group,
    wanda_scores,
)
from optimum_mwanda.parts.masks import lowest_k_per_column
from optimum_mwanda.parts.sparsegpt import (
    inverse_hessian_cholesky,
    nm_group_errors,
    nm_patterns,
    refine_kept_weights,
)
from optimum_mwanda.parts.statistics import (
    _FUSED_FLOAT64_ROWS,
    _GRAM_ROW_BLOCKS,
    add_lower_gram,
    language_runs,
    symmetric_from_lower,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_per_row_mask_exact(sparsity):
    scores = torch.rand(17, 40)
    mask = per_row_mask(scores, sparsity)
    assert (mask.sum(dim=1) == int(40 * sparsity)).all()
    # Every pruned score is <= every kept score of the same row.
    for row in range(17):
        if mask[row].any() and (~mask[row]).any():
            assert scores[row][mask[row]].max() <= scores[row][~mask[row]].min()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_valid(n, m):
    scores = torch.rand(9, 32)
    mask = nm_mask(scores, n, m)
    kept = (~mask).reshape(9, 32 // m, m).sum(dim=2)
    assert (kept == n).all()
    groups = scores.reshape(9, -1, m)
    gmask = mask.reshape(9, -1, m)
    assert (groups.masked_fill(~gmask, -1).amax(2) <= groups.masked_fill(gmask, 2).amin(2)).all()


def test_lowest_k_mask_ties_go_to_earlier_positions():
    from optimum_mwanda.parts.masks import lowest_k_mask

    values = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    mask = lowest_k_mask(values, 2)
    assert mask.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]
    scores = torch.rand(50, 33)
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(
        1, torch.sort(scores, dim=1, stable=True).indices[:, :13], True
    )
    assert torch.equal(lowest_k_mask(scores, 13), expected)


@pytest.mark.parametrize("m,k", [(4, 2), (8, 4), (4, 0), (4, 4), (1, 1)])
def test_lowest_k_per_column_is_a_stable_sort(m, k):
    """The sweep's per-group selection by pairwise ranks equals a stable sort, ties included."""
    torch.manual_seed(m + k)
    values = torch.randint(0, 3, (m, 500)).float()  # many ties
    expected = torch.zeros_like(values, dtype=torch.bool).scatter_(
        0, torch.sort(values, dim=0, stable=True).indices[:k], True
    )
    assert torch.equal(lowest_k_per_column(values, k), expected)
    assert torch.equal(lowest_k_per_column(values.neg(), k).sum(0), torch.full((500,), k))


def test_nm_mask_indivisible():
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.rand(3, 10), 2, 4)


def test_nonfinite_scores_rejected():
    scores = torch.rand(3, 8)
    scores[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        per_row_mask(scores, 0.5)


def test_wanda_mask_matches_loop_reference():
    torch.manual_seed(0)
    weight = torch.randn(12, 20)
    x = torch.randn(50, 20) * torch.rand(20) * 3
    stats = FeatureStatistics(20, 1)
    stats.update(x, torch.zeros(50, dtype=torch.long))
    mask = mask_from_scores(wanda_scores(weight, stats.pooled_norm), 0.5, None)
    # Independent computation: ||X_j||_2 over tokens, then per row the 10 lowest |W| * norm.
    norms = [sum(float(x[t, j]) ** 2 for t in range(50)) ** 0.5 for j in range(20)]
    for i in range(12):
        row = sorted(range(20), key=lambda j: abs(float(weight[i, j])) * norms[j])
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == set(row[:10])


def test_statistics_per_language():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    lang = torch.tensor([0, 0, 1])
    stats = FeatureStatistics(2, 2, track_activation=True, activation_threshold=1.0)
    stats.update(x, lang)
    torch.testing.assert_close(stats.language_norms, torch.tensor([[5.0**0.5, 0.0], [0.0, 2.0]]))
    torch.testing.assert_close(stats.pooled_norm, torch.tensor([(10 / 3) ** 0.5, (4 / 3) ** 0.5]))
    torch.testing.assert_close(stats.activation_probability, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # Non-finite inputs are not rejected per update; they surface in the statistics the pruner checks.
    stats.update(torch.tensor([[float("inf"), 0.0]]), torch.tensor([0]))
    assert not torch.isfinite(stats.pooled_norm).all()


def test_feature_sums_go_run_by_run_and_match_the_per_token_sums():
    """FeatureStatistics sums each same-language run of a sequence on its own (in float32, added in
    float64): the per-language sums are the per-token float64 sums to float32 rounding, activity counts are
    exact, runs never cross a sequence boundary, and re-batching the same sequences gives the same bits."""
    assert language_runs(torch.tensor([2, 2, 0, 0, 0, 1]), [3, 0, 3]) == [
        (0, 2, 2),
        (2, 3, 0),
        (3, 5, 0),
        (5, 6, 1),
    ]
    assert language_runs(torch.tensor([1, 1, 1])) == [(0, 3, 1)]
    torch.manual_seed(0)
    lengths = [7, 12, 5, 9]
    x = torch.randn(sum(lengths), 6) * 10
    language = torch.cat([torch.full((n,), lang) for n, lang in zip(lengths, [2, 0, 2, 1])])
    language[20] = 1  # a sequence that changes language mid-way still counts every token once
    whole = FeatureStatistics(6, 3, track_activation=True, activation_threshold=1.0, track_mean=True)
    whole.update(x, language, lengths)
    expected = torch.zeros(3, 6, dtype=torch.float64).index_add_(0, language, (x * x).double())
    torch.testing.assert_close(whole.sum_squares, expected, rtol=1e-6, atol=0)
    expected_sum = torch.zeros(3, 6, dtype=torch.float64).index_add_(0, language, x.double())
    # Signed sums cancel: compare against the float32 scale of the terms, not of the result.
    scale = torch.zeros(3, 6, dtype=torch.float64).index_add_(0, language, x.abs().double())
    assert ((whole.sum - expected_sum).abs() <= 1e-6 * scale).all()
    rms = (x * x).mean(dim=1, keepdim=True).sqrt()
    counts = torch.zeros(3, 6, dtype=torch.float64).index_add_(0, language, (x.abs() > rms).double())
    assert torch.equal(whole.active, counts)
    assert torch.equal(whole.tokens, torch.bincount(language, minlength=3).double())
    rebatched = FeatureStatistics(6, 3, track_activation=True, activation_threshold=1.0, track_mean=True)
    for part, lang, n in zip(x.split([19, 14]), language.split([19, 14]), [lengths[:2], lengths[2:]]):
        rebatched.update(part, lang, n)
    for name, value in whole.raw_sums().items():
        assert torch.equal(rebatched.raw_sums()[name], value), name


def test_hessian_long_and_short_sequences_take_either_product_and_agree():
    """A long sequence's X^T X is a float32 product added in float64, a short one's a fused float64 addmm
    (HessianStatistics.update): both match the float64 reference and stay independent of batching."""
    torch.manual_seed(0)
    lengths = [_FUSED_FLOAT64_ROWS + 40, 11, _FUSED_FLOAT64_ROWS - 1]
    x = torch.randn(sum(lengths), 16)
    language = torch.zeros(sum(lengths), dtype=torch.long)
    h = HessianStatistics(16, 1)
    h.update(x, language, lengths)
    reference = x.double().t() @ x.double()
    torch.testing.assert_close(symmetric_from_lower(h.hessian_sum), reference, rtol=1e-6, atol=1e-4)
    batched = HessianStatistics(16, 1)
    for part, lang, n in zip(x.split(lengths), language.split(lengths), lengths):
        batched.update(part, lang, [n])
    assert torch.equal(batched.hessian_sum, h.hessian_sum)


def test_hessian_groups_of_sequences_do_not_depend_on_batches_and_copy_what_waits():
    """``sequence_group=3``: the sampled tokens of 3 consecutive sequences form one product, whatever the
    batches (a sequence with no tokens, given alone as a batch, still counts); the
    tokens waiting for the rest of their group are copies, not views of the caller's batch."""
    torch.manual_seed(0)
    lengths = [30, 0, 17, 25, 9, 40, 12, 0]
    x = torch.randn(sum(lengths), 16)
    language = torch.zeros(sum(lengths), dtype=torch.long)
    whole = HessianStatistics(16, 1, token_stride=2, sequence_group=3)
    whole.update(x, language, lengths)
    expected = torch.zeros(16, 16, dtype=torch.float64)
    sampled = [part[::2] for part in x.split(lengths)]
    for start in range(0, len(lengths), 3):
        group = torch.cat(sampled[start : start + 3]).double()
        expected += group.t() @ group
    assert whole.count == sum(part.shape[0] for part in sampled)
    torch.testing.assert_close(symmetric_from_lower(whole.hessian_sum), expected, rtol=1e-6, atol=1e-4)
    one_by_one = HessianStatistics(16, 1, token_stride=2, sequence_group=3)
    for part, n in zip(x.clone().split(lengths), lengths):
        one_by_one.update(part, language[:n], [n])
        part.zero_()  # the caller reuses its buffer: what waits for its group was copied
    assert torch.equal(one_by_one.hessian_sum, whole.hessian_sum)
    # One product per sequence (the default) is another sum, equal to float32 rounding.
    single = HessianStatistics(16, 1, token_stride=2)
    single.update(x, language, lengths)
    torch.testing.assert_close(single.hessian, whole.hessian, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence_group"):
        HessianStatistics(16, 1, sequence_group=0)


def test_diagonal_dampening_shrinks_the_hessian_towards_its_diagonal():
    """``diagonal_dampening=d`` is the sweep on ``H + d * diag(H)``; on a diagonal Hessian the sweep is
    Wanda (no update), so a very large ``d`` gives Wanda's N:M mask and leaves the kept weights alone."""
    torch.manual_seed(0)
    x = torch.randn(200, 16) @ torch.randn(16, 16) * torch.rand(16)
    hessian = x.t() @ x / 200
    weight = torch.randn(6, 16)
    shrunk = hessian + torch.diag(0.3 * torch.diagonal(hessian))
    for nm in (None, (2, 4)):
        a, mask_a = sparsegpt_prune(weight, hessian, 0.5, nm=nm, diagonal_dampening=0.3)
        b, mask_b = sparsegpt_prune(weight, shrunk, 0.5, nm=nm)
        assert torch.equal(mask_a, mask_b)
        torch.testing.assert_close(a, b)  # (1 + d) * h and h + d * h round differently
    c, mask_c = sparsegpt_prune(weight, hessian, 0.5, nm=(2, 4), diagonal_dampening=1e6)
    # (SparseGPT's isotropic dampening, 1% of the mean diagonal, still applies.)
    diagonal = torch.diagonal(hessian)
    wanda = nm_mask(wanda_scores(weight, (diagonal + 0.01 * diagonal.mean()).sqrt()), 2, 4)
    assert torch.equal(mask_c, wanda)
    torch.testing.assert_close(c, weight.masked_fill(wanda, 0.0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="diagonal_dampening"):
        sparsegpt_prune(weight, hessian, 0.5, diagonal_dampening=-1.0)


@pytest.mark.parametrize("features", [1, 3, 10, 17])
@pytest.mark.parametrize("tokens", [5, _FUSED_FLOAT64_ROWS + 3])
def test_lower_gram_staircase_is_the_full_product(features, tokens):
    """add_lower_gram accumulates X^T X's lower triangle only (row blocks times the columns up to each
    block's end, for any width, also narrower than the number of blocks); symmetric_from_lower restores the
    full product, exactly symmetric."""
    torch.manual_seed(features)
    x = torch.randn(tokens, features)
    total = torch.zeros(features, features, dtype=torch.float64)
    add_lower_gram(total, x)
    add_lower_gram(total, 2 * x)
    full = symmetric_from_lower(total)
    torch.testing.assert_close(full, 5 * x.double().t() @ x.double(), rtol=1e-6, atol=1e-4)
    assert torch.equal(full, full.t())
    # Nothing outside the staircase is touched.
    edges = [features * k // _GRAM_ROW_BLOCKS for k in range(_GRAM_ROW_BLOCKS + 1)]
    for start, end in zip(edges, edges[1:]):
        assert not total[start:end, end:].any()


def test_hessian_token_stride_for_keeps_enough_tokens_per_input():
    """The largest stride up to the cap (4) that leaves >= 1.75 sampled tokens per input, exactly at the
    boundary: 7 x 4 x 512 tokens give every 4th token at in = 2048, one token fewer every 3rd."""
    assert hessian_token_stride_for(14336, 2048) == 4
    assert hessian_token_stride_for(14335, 2048) == 3
    assert hessian_token_stride_for(28672, 2048) == 4  # capped
    assert hessian_token_stride_for(28672, 2048, max_stride=8) == 8
    assert hessian_token_stride_for(28671, 2048, max_stride=8) == 7
    assert hessian_token_stride_for(28672, 640, max_stride=16) == 16
    assert hessian_token_stride_for(100, 2048) == 1
    assert hessian_token_stride_for(0, 16) == 1
    assert hessian_token_stride_for(600, 100, tokens_per_input=3.0) == 2
    with pytest.raises(ValueError):
        hessian_token_stride_for(100, 0)


def test_hessian_is_running_mean():
    torch.manual_seed(0)
    x = torch.randn(30, 5)
    h = HessianStatistics(5, 1)
    h.update(x[:10], torch.zeros(10, dtype=torch.long))
    h.update(x[10:], torch.zeros(20, dtype=torch.long))
    torch.testing.assert_close(h.hessian, 2 * x.t() @ x / 30)


def test_mwanda_reduces_to_pooled_norm():
    pooled = torch.rand(8)
    lang = torch.rand(3, 8)
    prob = torch.rand(3, 8)
    assert torch.equal(mwanda_feature_importance(pooled, lang, prob, 0.0, 0.0), pooled)
    boosted = mwanda_feature_importance(pooled, lang, prob, 1.0, 0.0)
    torch.testing.assert_close(boosted, pooled + lang.std(0, unbiased=False))
    protected = mwanda_feature_importance(pooled, lang, prob, 0.0, 2.0)
    torch.testing.assert_close(protected, pooled * (1 + 2 * prob.amax(0)))


def test_negative_factor_penalises_negative_features():
    norm = torch.tensor([1.0, 1.0])
    negative = torch.tensor([0.5, 4.0])
    factor = negative_feature_factor(norm, negative)
    torch.testing.assert_close(factor, torch.tensor([2.0, 0.25]))
    assert torch.equal(negative_feature_factor(norm, negative, power=0.0), torch.ones(2))


def _correlated_inputs(n=400, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 4, generator=g)
    mix = torch.randn(4, d, generator=g)
    return base @ mix + 0.3 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda(nm):
    x = _correlated_inputs()
    torch.manual_seed(1)
    weight = torch.randn(24, 32)
    hessian = HessianStatistics(32, 1, track_norms=True)
    hessian.update(x, torch.zeros(x.shape[0], dtype=torch.long))
    pruned, mask = sparsegpt_prune(weight, hessian.hessian, 0.5, nm=nm, block_size=8)
    assert torch.equal(pruned == 0, mask)
    wanda_mask = mask_from_scores(wanda_scores(weight, hessian.features.pooled_norm), 0.5, nm)
    wanda = weight.masked_fill(wanda_mask, 0.0)
    err_sparsegpt = (x @ (weight - pruned).t()).norm()
    err_wanda = (x @ (weight - wanda).t()).norm()
    assert err_sparsegpt < err_wanda
    assert abs(float(mask.float().mean()) - 0.5) < 1e-6
    if nm is not None:
        assert ((~mask).reshape(24, 8, 4).sum(2) == 2).all()


def test_sparsegpt_dead_columns_and_retry():
    x = _correlated_inputs(d=16)
    x[:, 3] = 0.0  # a dead input feature
    h = 2 * x.t() @ x / x.shape[0]
    pruned, _ = sparsegpt_prune(torch.randn(8, 16), h, 0.5, block_size=16)
    assert (pruned[:, 3] == 0).all()
    # A matrix that is not positive definite even after dampening: a clear error.
    bad = -torch.eye(4)
    with pytest.raises(CholeskyError, match="dampening"):
        inverse_hessian_cholesky(bad, 0.01, retries=2)
    # A singular-but-fixable Hessian (rank 1) succeeds thanks to dampening.
    v = torch.randn(4, 1)
    upper, dead, damp = inverse_hessian_cholesky(v @ v.t(), 0.01)
    assert torch.isfinite(upper).all() and damp >= 0.01


def test_sparsegpt_retries_with_more_dampening():
    # Tiny negative eigenvalue: fails with 1e-4 dampening, passes after one x10 increase.
    h = torch.diag(torch.tensor([1.0, 1.0, -5e-4]))
    _, _, damp = inverse_hessian_cholesky(h, 1e-4)
    assert damp > 1e-4


@pytest.mark.parametrize("bound", [0.02, 0.08, 0.2])
def test_schedule_bounds_and_weighted_mean(bound):
    torch.manual_seed(0)
    signal = torch.rand(12).tolist()
    counts = (torch.rand(12) * 100 + 1).tolist()
    sched = schedule_from_signal(signal, counts, 0.5, bound, higher_signal_prunes_less=True)
    assert all(0.5 - bound - 1e-9 <= s <= 0.5 + bound + 1e-9 for s in sched)
    mean = sum(s * c for s, c in zip(sched, counts)) / sum(counts)
    assert abs(mean - 0.5) < 1e-9
    # Monotone: a higher signal never gets a higher sparsity.
    order = sorted(range(12), key=lambda i: signal[i])
    assert all(sched[order[i]] >= sched[order[i + 1]] - 1e-12 for i in range(11))


def test_constant_signal_is_uniform():
    assert schedule_from_signal([0.3] * 4, [1] * 4, 0.6, 0.08, True) == [0.6] * 4


def test_owl_and_cwl_directions():
    counts = [1.0, 1.0, 1.0]
    owl = owl_schedule([0.1, 0.2, 0.3], counts, 0.5, 0.08)
    assert owl[0] > owl[1] > owl[2]  # more outliers -> keep more
    specific = cwl_schedule([0.9, 0.5, 0.7], counts, 0.5, 0.08, protect="specific")
    assert specific[1] < specific[2] < specific[0]  # less correlated -> keep more
    shared = cwl_schedule([0.9, 0.5, 0.7], counts, 0.5, 0.08, protect="shared")
    assert shared[0] < shared[2] < shared[1]


def test_depth_schedule_rises_linearly_with_weighted_mean():
    sched = depth_schedule([1.0] * 5, 0.6, 0.1)
    assert sched[0] == pytest.approx(0.5) and sched[-1] == pytest.approx(0.7)
    steps = [b - a for a, b in zip(sched, sched[1:])]
    assert all(step == pytest.approx(0.05) for step in steps)
    counts = [3.0, 1.0, 1.0, 1.0, 2.0]
    sched = depth_schedule(counts, 0.6, 0.1)
    assert sched == sorted(sched) and 0.5 - 1e-9 <= sched[0] and sched[-1] <= 0.7 + 1e-9
    assert sum(s * c for s, c in zip(sched, counts)) / sum(counts) == pytest.approx(0.6, abs=1e-9)
    assert depth_schedule([1.0], 0.5, 0.1) == [0.5]


def test_outlier_ratio_and_correlation():
    scores = [torch.tensor([1.0, 1.0, 1.0, 100.0])]
    assert outlier_ratio(scores, 2.0) == 0.25
    profiles = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 2.0, 1.0]])
    # pairs: (0,1)=1, (0,2)=-1, (1,2)=-1
    assert cross_lingual_correlation(profiles) == pytest.approx(-1 / 3)
    with pytest.raises(ValueError):
        cross_lingual_correlation(profiles[:1])


@pytest.mark.parametrize(
    "nm,selection,steps",
    [(None, "greedy", 0), ((2, 4), "greedy", 0), ((2, 4), "joint", 0), ((2, 4), "greedy", 3)],
)
def test_sparsegpt_group_equals_separate(nm, selection, steps):
    x = _correlated_inputs(d=32)
    h = 2 * x.t() @ x / x.shape[0]
    torch.manual_seed(2)
    a, b = torch.randn(10, 32), torch.randn(6, 32) * 3
    options = {"nm": nm, "block_size": 16, "nm_selection": selection, "refinement_steps": steps}
    grouped, masks = sparsegpt_prune_group([a, b], h, 0.5, **options)
    for weight, new, mask in zip((a, b), grouped, masks):
        alone, alone_mask = sparsegpt_prune(weight, h, 0.5, **options)
        assert torch.equal(mask, alone_mask)
        torch.testing.assert_close(new, alone)


def _plain_sparsegpt(weight, hessian, sparsity, nm, block_size, dampening=0.01):
    """Reference: SparseGPT's algorithm without lazy or chunked updates, in float64. Every pruned column
    updates every later column at once; masks chosen per block (unstructured) or per group (N:M)."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(dampening * torch.diagonal(h).mean())
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    rows, cols = w.shape
    mask = torch.zeros_like(w, dtype=torch.bool)
    for j in range(cols):
        if nm is None and j % block_size == 0:
            end = min(j + block_size, cols)
            saliency = (w[:, j:end] / torch.diagonal(upper)[j:end]).pow(2)
            k = int(saliency.numel() * sparsity)
            flat = torch.zeros(saliency.numel(), dtype=torch.bool)
            flat[torch.argsort(saliency.t().reshape(-1), stable=True)[:k]] = True
            mask[:, j:end] = flat.view(end - j, rows).t()
        if nm is not None and j % nm[1] == 0:
            saliency = (w[:, j : j + nm[1]] / torch.diagonal(upper)[j : j + nm[1]]).pow(2)
            order = torch.argsort(saliency, dim=1, stable=True)[:, : nm[1] - nm[0]]
            mask[:, j : j + nm[1]] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, order, True)
        err = torch.where(mask[:, j], w[:, j], torch.zeros_like(w[:, j])) / upper[j, j]
        w[:, j:] -= err.unsqueeze(1) * upper[j, j:].unsqueeze(0)
    return w.masked_fill(mask, 0.0), mask


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
@pytest.mark.parametrize("block_size", [16, 64])
def test_sparsegpt_sweep_equals_the_plain_algorithm(nm, block_size):
    """The blocked, chunked sweep (lazy updates at two levels) is the column-by-column algorithm."""
    x = _correlated_inputs(n=400, d=64)
    h = 2 * x.t() @ x / x.shape[0]
    weight = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    expected, expected_mask = _plain_sparsegpt(weight, h, 0.5, nm, block_size)
    pruned, mask = sparsegpt_prune(weight, h, 0.5, nm=nm, block_size=block_size)
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(pruned, expected.float(), atol=1e-4, rtol=1e-4)


def _group_errors_by_full_recurrence(weights, upper, n, m):
    """Reference for ``nm_group_errors``: the sweep's own column-by-column updates, for every pattern."""
    out = []
    for pattern in itertools.combinations(range(m), m - n):
        current, errors = weights.clone(), []
        for j in range(m):
            if j in pattern:
                errors.append(current[j] / upper[j, j])
                current[j + 1 :] -= upper[j, j + 1 :, None] * errors[-1]
        out.append(torch.stack(errors))
    return torch.stack(out)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_group_errors_follow_the_sweep_updates(n, m):
    torch.manual_seed(n * m)
    a = torch.randn(m, m, dtype=torch.float64)
    upper = torch.linalg.cholesky(a @ a.t() + m * torch.eye(m, dtype=torch.float64), upper=True)
    weights = torch.randn(m, 11, dtype=torch.float64)
    patterns = nm_patterns(n, m)
    assert patterns.shape == (math.comb(m, m - n), m - n)
    torch.testing.assert_close(
        nm_group_errors(weights, upper, patterns), _group_errors_by_full_recurrence(weights, upper, n, m)
    )


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_joint_nm_selection_loses_less_than_greedy(nm):
    """One group (in = M): the joint pattern's OBS loss (the output error under the dampened Hessian the
    sweep solves with) is the least of all patterns, so at most the greedy one's, row by row; over many
    groups the output error is lower on correlated inputs too."""
    n, m = nm
    x = _correlated_inputs(d=m)
    h = 2 * x.t() @ x / x.shape[0]
    dampened = (h + 0.01 * h.diagonal().mean() * torch.eye(m)).double()
    torch.manual_seed(3)
    weight = torch.randn(200, m)
    errors = {}
    for selection in ("greedy", "joint"):
        pruned, mask = sparsegpt_prune(weight, h, 0.5, nm=nm, block_size=m, nm_selection=selection)
        assert torch.equal(pruned == 0, mask) and ((~mask).sum(1) == n).all()
        delta = (weight - pruned).double()
        errors[selection] = torch.einsum("ri,ij,rj->r", delta, dampened, delta)
    assert (errors["joint"] <= errors["greedy"] * (1 + 1e-5)).all()
    assert errors["joint"].sum() < errors["greedy"].sum()

    x = _correlated_inputs(d=64)
    h = 2 * x.t() @ x / x.shape[0]
    weight = torch.randn(40, 64)
    totals = {}
    for selection in ("greedy", "joint"):
        pruned, mask = sparsegpt_prune(weight, h, 0.5, nm=nm, block_size=16, nm_selection=selection)
        assert torch.equal(pruned == 0, mask) and ((~mask).reshape(40, -1, m).sum(2) == n).all()
        totals[selection] = float((x @ (weight - pruned).t()).norm())
    assert totals["joint"] < totals["greedy"]


def test_joint_nm_selection_is_greedy_without_cross_feature_terms():
    """With a diagonal Hessian pruning one input moves no other, so both selections are the same sweep."""
    h = torch.diag(torch.rand(32) + 0.5)
    torch.manual_seed(4)
    weight = torch.randn(12, 32)
    greedy = sparsegpt_prune(weight, h, 0.5, nm=(2, 4), block_size=16)
    joint = sparsegpt_prune(weight, h, 0.5, nm=(2, 4), block_size=16, nm_selection="joint")
    assert torch.equal(greedy[1], joint[1])
    torch.testing.assert_close(greedy[0], joint[0])
    with pytest.raises(ValueError, match="nm_selection"):
        sparsegpt_prune(weight, h, 0.5, nm=(2, 4), nm_selection="best")


def _row_losses(dense, new, hessian):
    delta = (dense - new).double()
    return torch.einsum("ri,ij,rj->r", delta, hessian.double(), delta)


def test_refine_kept_weights_descends_to_the_fixed_mask_least_squares():
    """Each step lowers every row's loss; enough steps reach the exact per-row solution for the mask."""
    x = _correlated_inputs(d=24)
    h = 2 * x.t() @ x / x.shape[0] + 0.01 * torch.eye(24)
    torch.manual_seed(5)
    dense = torch.randn(9, 24)
    keep = torch.rand(9, 24) > 0.5
    start = dense.masked_fill(~keep, 0.0)
    losses = [_row_losses(dense, refine_kept_weights(dense, start, keep, h, k), h) for k in (0, 1, 2, 5)]
    for before, after in zip(losses, losses[1:]):
        assert (after <= before * (1 + 1e-5) + 1e-9).all()
    assert losses[-1].sum() < 0.5 * losses[0].sum()
    refined = refine_kept_weights(dense, start, keep, h, 60)
    assert (refined[~keep] == 0).all()
    hd = h.double()
    for row in range(9):
        k, p = keep[row], ~keep[row]
        # w'_K = w_K + H_KK^-1 H_KP w_P minimises (w - w') H (w - w')^T with w'_P = 0.
        exact = dense[row, k].double() + torch.linalg.solve(hd[k][:, k], hd[k][:, p] @ dense[row, p].double())
        torch.testing.assert_close(refined[row, k].double(), exact, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(refine_kept_weights(dense, start, keep, h, 0), start)
    with pytest.raises(ValueError, match="steps"):
        refine_kept_weights(dense, start, keep, h, -1)
    with pytest.raises(ValueError, match="do not match"):
        refine_kept_weights(dense, start, keep[:, :5], h, 2)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sweep_refinement_keeps_the_mask_and_lowers_the_error(nm):
    x = _correlated_inputs(d=64)
    h = 2 * x.t() @ x / x.shape[0]
    h[7, :] = h[:, 7] = 0.0  # a dead input stays zero
    torch.manual_seed(6)
    weight = torch.randn(30, 64)
    plain, plain_mask = sparsegpt_prune(weight, h, 0.5, nm=nm, block_size=16)
    refined, mask = sparsegpt_prune(weight, h, 0.5, nm=nm, block_size=16, refinement_steps=4)
    assert torch.equal(mask, plain_mask) and torch.equal(refined == 0, (refined == 0) | mask)
    assert (refined[mask] == 0).all() and (refined[:, 7] == 0).all()
    assert (x @ (weight - refined).t()).norm() < (x @ (weight - plain).t()).norm()


def test_hessian_token_stride_samples_every_kth_token_of_each_sequence():
    """``token_stride=k`` builds H from tokens 0, k, 2k, ... of every sequence; norms still see every token,
    and the sample does not depend on how the sequences are batched."""
    torch.manual_seed(0)
    lengths = [7, 5, 9]
    x = torch.randn(sum(lengths), 6)
    language = torch.tensor([0] * 7 + [1] * 5 + [0] * 9)
    h = HessianStatistics(6, 2, token_stride=3, track_norms=True)
    h.update(x, language, lengths)
    sampled = torch.cat([part[::3] for part in x.split(lengths)])
    assert h.count == sampled.shape[0] == 3 + 2 + 3
    torch.testing.assert_close(h.hessian, 2 * sampled.t() @ sampled / sampled.shape[0])
    torch.testing.assert_close(h.features.pooled_norm, x.pow(2).mean(0).sqrt())
    # Without the norms (the default, what the sweep uses) H is the same and the raw sums hold H only.
    plain = HessianStatistics(6, 2, token_stride=3)
    plain.update(x, language, lengths)
    assert plain.features is None and set(plain.raw_sums()) == {"hessian_sum", "token_count"}
    assert torch.equal(plain.hessian, h.hessian)
    batched = HessianStatistics(6, 2, token_stride=3)
    batched.update(x[:7], language[:7], [7])
    batched.update(x[7:], language[7:], lengths[1:])
    assert torch.equal(batched.hessian_sum, h.hessian_sum)
    with pytest.raises(ValueError, match="token_stride"):
        HessianStatistics(6, 2, token_stride=0)


@pytest.mark.parametrize("refinement_steps", [0, 3])
def test_sweep_that_overwrites_its_hessian_gives_the_same_weights(refinement_steps):
    """overwrite_hessian=True (the walk hands over a released H) saves an in x in copy, not a bit of the
    result: the sweep and the refinement see the same dampened matrix."""
    torch.manual_seed(0)
    x = torch.randn(300, 40) @ torch.randn(40, 40)
    hessian = (x.t() @ x / 300).float()
    weights = [torch.randn(12, 40), torch.randn(7, 40)]
    kept, masks = sparsegpt_prune_group(
        weights, hessian, 0.5, block_size=8, diagonal_dampening=0.3, refinement_steps=refinement_steps
    )
    owned = hessian.clone()
    again, masks_again = sparsegpt_prune_group(
        weights,
        owned,
        0.5,
        block_size=8,
        diagonal_dampening=0.3,
        refinement_steps=refinement_steps,
        overwrite_hessian=True,
    )
    for a, b, m, n in zip(kept, again, masks, masks_again):
        assert torch.equal(a, b) and torch.equal(m, n)
    assert not torch.equal(owned, hessian)  # it was overwritten (with the dampened matrix)
