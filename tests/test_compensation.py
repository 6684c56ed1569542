"""Mean-shift compensation: the closed form, its invariants and its effect on synthetic multilingual data."""

import pytest
import torch

from optimum_mwanda.parts import (
    FeatureStatistics,
    mask_from_scores,
    mean_shift_compensation,
    wanda_scores,
)


def _synthetic_languages(n_lang=4, features=48, tokens=4000, seed=0, noise_seed=None):
    """Tokens ``x = mu_l + noise``: each language has its own mean input, as real languages do. The means
    and noise scales depend on ``seed`` only; ``noise_seed`` draws fresh (held-out) tokens."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(n_lang, features, generator=generator)
    scales = 0.2 + torch.rand(features, generator=generator)
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
    language = torch.arange(tokens) % n_lang
    x = means[language] + scales * torch.randn(tokens, features, generator=generator)
    return x, language


def _statistics(x, language, n_lang):
    stats = FeatureStatistics(x.shape[1], n_lang, track_mean=True)
    stats.update(x, language)
    return stats


def test_statistics_track_means_and_second_moments():
    x, language = _synthetic_languages(n_lang=3, tokens=300)
    stats = _statistics(x, language, 3)
    for lang in range(3):
        rows = x[language == lang]
        assert torch.allclose(stats.language_means[lang], rows.mean(0), atol=1e-5)
        assert torch.allclose(stats.language_second_moments[lang], rows.pow(2).mean(0), atol=1e-4)
    assert torch.allclose(stats.language_shares, torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.allclose(stats.pooled_mean[0], x.mean(0), atol=1e-5)
    assert torch.allclose(stats.pooled_second_moment[0], x.pow(2).mean(0), atol=1e-4)
    with pytest.raises(RuntimeError, match="means were not tracked"):
        _ = FeatureStatistics(4, 1).language_means


def test_closed_form_matches_a_direct_ridge_solve():
    """Row by row, the update solves min sum_l pi_l (Delta_l - d.mu_l)^2 + sum_K v_j d_j^2 (lstsq here)."""
    torch.manual_seed(0)
    n_lang, features = 3, 20
    weight = torch.randn(5, features)
    mask = torch.rand(5, features) < 0.5
    means = torch.randn(n_lang, features)
    second = means.pow(2) + 0.1 + torch.rand(n_lang, features)
    shares = torch.tensor([0.5, 0.3, 0.2])
    new = mean_shift_compensation(weight, mask, means, second, shares)
    variance = ((second - means.pow(2)) * shares.unsqueeze(1)).sum(0)
    for row in range(weight.shape[0]):
        kept = ~mask[row]
        shift = (weight[row] * mask[row]) @ means.t()  # [L]
        design = torch.cat(
            [shares.sqrt().unsqueeze(1) * means[:, kept], torch.diag(variance[kept].sqrt())]
        ).double()
        target = torch.cat([shares.sqrt() * shift, torch.zeros(int(kept.sum()))]).double()
        delta = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
        expected = weight[row].double().clone()
        expected[mask[row]] = 0.0
        expected[kept] += delta
        assert torch.allclose(new[row].double(), expected, atol=1e-4), row


def test_pruned_positions_stay_zero_including_nm():
    x, language = _synthetic_languages()
    stats = _statistics(x, language, 4)
    weight = torch.randn(16, x.shape[1])
    for structure in (None, (2, 4)):
        mask = mask_from_scores(wanda_scores(weight, stats.pooled_norm), 0.5, structure)
        new = mean_shift_compensation(
            weight, mask, stats.language_means, stats.language_second_moments, stats.language_shares
        )
        assert torch.equal(new == 0, mask | (weight == 0))
        assert not torch.equal(new[~mask], weight[~mask])  # kept weights did move


def test_zero_means_leave_the_masked_weight_unchanged():
    weight = torch.randn(6, 10)
    mask = torch.rand(6, 10) < 0.5
    new = mean_shift_compensation(
        weight, mask, torch.zeros(2, 10), torch.ones(2, 10), torch.tensor([0.5, 0.5])
    )
    assert torch.equal(new, weight.masked_fill(mask, 0.0))


def test_language_without_tokens_places_no_constraint():
    torch.manual_seed(1)
    weight, mask = torch.randn(4, 12), torch.rand(4, 12) < 0.5
    means, second = torch.randn(2, 12), torch.ones(2, 12) * 3
    only_first = mean_shift_compensation(weight, mask, means[:1], second[:1], torch.ones(1))
    with_empty = mean_shift_compensation(weight, mask, means, second, torch.tensor([1.0, 0.0]))
    assert torch.allclose(only_first, with_empty, atol=1e-6)


def test_compensation_lowers_held_out_output_error_per_language():
    """On fresh tokens from the same languages, the per-language compensated rows err less than masking alone,
    and more so than compensating the pooled mean only."""
    n_lang = 4
    x, language = _synthetic_languages(n_lang=n_lang, seed=0)
    stats = _statistics(x, language, n_lang)
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(32, x.shape[1], generator=generator)
    mask = mask_from_scores(wanda_scores(weight, stats.pooled_norm), 0.5, None)
    masked = weight.masked_fill(mask, 0.0)
    per_language = mean_shift_compensation(
        weight, mask, stats.language_means, stats.language_second_moments, stats.language_shares
    )
    pooled = mean_shift_compensation(
        weight, mask, stats.pooled_mean, stats.pooled_second_moment, torch.ones(1)
    )
    held, held_lang = _synthetic_languages(n_lang=n_lang, seed=0, tokens=2000, noise_seed=99)

    def error(w, lang):
        rows = held[held_lang == lang]
        return (rows @ (weight - w).t()).pow(2).mean()

    for lang in range(n_lang):
        assert error(per_language, lang) < 0.8 * error(masked, lang), lang
    total = {
        name: sum(error(w, lang) for lang in range(n_lang))
        for name, w in {"masked": masked, "pooled": pooled, "language": per_language}.items()
    }
    assert total["language"] < total["pooled"] < total["masked"]


def test_shape_errors_are_clear():
    weight, mask = torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="must be equal 2-D shapes"):
        mean_shift_compensation(weight, mask[:, :2], torch.zeros(1, 4), torch.ones(1, 4), torch.ones(1))
    with pytest.raises(ValueError, match="do not match"):
        mean_shift_compensation(weight, mask, torch.zeros(1, 5), torch.ones(1, 5), torch.ones(1))
    with pytest.raises(ValueError, match="non-negative"):
        mean_shift_compensation(weight, mask, torch.zeros(2, 4), torch.ones(2, 4), torch.tensor([1.0, -1.0]))


# -- low-rank compensation: means plus the top principal directions of the within-language covariance ----


def _correlated_languages(n_lang=3, features=40, tokens=6000, rank=6, seed=0, noise_seed=None):
    """``x = mu_l + B z + noise``: a few strong shared directions, as real activations have."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(n_lang, features, generator=generator)
    basis = torch.randn(features, rank, generator=generator) * torch.logspace(0.5, -0.5, rank)
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
    language = torch.arange(tokens) % n_lang
    z = torch.randn(tokens, rank, generator=generator)
    x = means[language] + z @ basis.t() + 0.1 * torch.randn(tokens, features, generator=generator)
    return x, language


def test_low_rank_compensation_is_the_exact_solve_under_its_model():
    """``delta_K = H_KK^-1 H_KP w_P`` row by row for ``H = U U^T + D`` (a direct solve here)."""
    from optimum_mwanda.parts import low_rank_compensation

    torch.manual_seed(0)
    features = 24
    weight, mask = torch.randn(6, features), torch.rand(6, features) < 0.5
    factors, diagonal = torch.randn(features, 5), 0.2 + torch.rand(features)
    new = low_rank_compensation(weight, mask, factors, diagonal)
    h = (factors @ factors.t() + torch.diag(diagonal)).double()
    for row in range(weight.shape[0]):
        kept, pruned = ~mask[row], mask[row]
        delta = torch.linalg.solve(h[kept][:, kept], h[kept][:, pruned] @ weight[row, pruned].double())
        torch.testing.assert_close(
            new[row, kept], (weight[row, kept].double() + delta).float(), atol=1e-4, rtol=1e-4
        )
        assert (new[row, pruned] == 0).all()


def test_low_rank_with_means_only_is_mean_shift_compensation():
    from optimum_mwanda.parts import covariance_factors, low_rank_compensation

    x, language = _synthetic_languages(n_lang=3, tokens=600)
    stats = _statistics(x, language, 3)
    weight = torch.randn(8, x.shape[1])
    mask = mask_from_scores(wanda_scores(weight, stats.pooled_norm), 0.5, None)
    within = (
        (stats.language_second_moments - stats.language_means.pow(2))
        * stats.language_shares.float().unsqueeze(1)
    ).sum(0)
    factors, diagonal = covariance_factors(stats.language_means, stats.language_shares, None, None, within)
    expected = mean_shift_compensation(
        weight, mask, stats.language_means, stats.language_second_moments, stats.language_shares
    )
    torch.testing.assert_close(
        low_rank_compensation(weight, mask, factors, diagonal), expected, atol=1e-5, rtol=1e-4
    )


def test_closed_form_shrinkage_is_the_exact_solve_on_the_shrunk_hessian():
    """``diagonal_dampening=d`` gives ``delta_K = H'_KK^-1 H'_KP w_P`` for ``H' = H + d diag(H)``, the
    sweep's shrinkage, with ``H = U U^T + D`` the model ``covariance_factors`` builds."""
    from optimum_mwanda.parts import covariance_factors, low_rank_compensation

    x, language = _correlated_languages(n_lang=3, features=24, tokens=900)
    stats = _statistics(x, language, 3)
    generator = torch.Generator().manual_seed(1)
    directions = torch.linalg.qr(torch.randn(24, 4, generator=generator)).Q
    eigenvalues = torch.tensor([2.0, 1.0, 0.5, 0.25])
    within = (
        (stats.language_second_moments - stats.language_means.pow(2))
        * stats.language_shares.float().unsqueeze(1)
    ).sum(0)
    weight = torch.randn(5, 24, generator=generator)
    mask = torch.rand(5, 24, generator=generator) < 0.5
    args = (stats.language_means, stats.language_shares, directions, eigenvalues, within)
    factors, diagonal = covariance_factors(*args)
    h = (factors @ factors.t() + torch.diag(diagonal)).double()
    previous = None
    for d in (0.0, 0.3, 3.0):
        shrunk_factors, shrunk_diagonal = covariance_factors(*args, diagonal_dampening=d)
        torch.testing.assert_close(shrunk_factors, factors)
        shrunk = h + d * torch.diag(torch.diagonal(h))
        torch.testing.assert_close(
            (shrunk_factors @ shrunk_factors.t() + torch.diag(shrunk_diagonal)).double(),
            shrunk,
            atol=1e-5,
            rtol=1e-5,
        )
        new = low_rank_compensation(weight, mask, shrunk_factors, shrunk_diagonal)
        for row in range(weight.shape[0]):
            kept, pruned = ~mask[row], mask[row]
            delta = torch.linalg.solve(
                shrunk[kept][:, kept], shrunk[kept][:, pruned] @ weight[row, pruned].double()
            )
            torch.testing.assert_close(
                new[row, kept], (weight[row, kept].double() + delta).float(), atol=1e-4, rtol=1e-4
            )
            assert (new[row, pruned] == 0).all()
        # A stronger shrinkage moves the kept weights less: towards Wanda's (no update).
        size = (new - weight.masked_fill(mask, 0.0)).norm()
        assert previous is None or size < previous
        previous = size
    with pytest.raises(ValueError, match="diagonal_dampening"):
        covariance_factors(*args, diagonal_dampening=-0.1)


def test_sketched_directions_match_the_exact_covariance():
    x, language = _correlated_languages()
    stats = FeatureStatistics(x.shape[1], 3, track_mean=True, sketch_width=16)
    for start in range(0, len(x), 1000):
        stats.update(x[start : start + 1000], language[start : start + 1000])
    directions, values = stats.sketch.principal_directions(
        stats.tokens.sum(), stats.language_means, stats.language_shares, 6
    )
    covariance = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for lang in range(3):
        rows = x[language == lang].double()
        centred = rows - rows.mean(0)
        covariance += centred.t() @ centred
    exact_values, exact_vectors = torch.linalg.eigh(covariance / len(x))
    exact_values, exact_vectors = exact_values.flip(0)[:6], exact_vectors.flip(1)[:, :6]
    torch.testing.assert_close(values.double(), exact_values, rtol=2e-2, atol=1e-3)
    overlap = (exact_vectors.float().t() @ directions).pow(2).sum() / 6
    assert overlap > 0.99


def test_sketch_summed_per_sequence_does_not_depend_on_the_batching():
    """Data-parallel shards and batch sizes group sequences differently: per-sequence products make the
    sketch (and so the low-rank directions) the same up to float64 rounding; whole-batch float32 products
    would not be."""
    torch.manual_seed(0)
    sequences = torch.randn(6, 64, 96) * torch.linspace(0.2, 3.0, 96)
    language = torch.zeros(64, dtype=torch.long)

    def sketch(groups, sequence_length):
        stats = FeatureStatistics(96, 1, track_mean=True, sketch_width=24)
        for group in groups:
            rows = sequences[list(group)].reshape(-1, 96)
            stats.update(rows, language.repeat(len(group)), sequence_length)
        return stats.sketch.sketch

    together = sketch([range(6)], 64)
    for grouping in ([[0, 2, 4], [1, 3, 5]], [[5], [0, 1], [2, 3, 4]]):
        regrouped = sketch(grouping, 64)
        assert ((regrouped - together).abs() / together.abs().max()).max() < 1e-13
    # The same regrouping with one float32 product per batch moves the sketch in float32's last digits.
    batched = sketch([[0, 2, 4], [1, 3, 5]], 192)
    assert ((batched - sketch([range(6)], 384)).abs() / together.abs().max()).max() > 1e-12


def test_more_directions_lower_held_out_error_and_keep_structure():
    """On inputs with shared low-rank structure, restoring the top directions as well as the means lowers
    the held-out output error in every language; zeros (and 2:4) are kept exactly."""
    from optimum_mwanda.configuration import MWandaConfig
    from optimum_mwanda.methods import MWandaAlgorithm

    x, language = _correlated_languages()
    held_out, held_language = _correlated_languages(noise_seed=1)
    weight = torch.randn(16, x.shape[1])
    errors = {}
    for rank in (0, 6):
        for structure in ("unstructured", "2:4"):
            config = MWandaConfig(compensation_rank=rank, mask_structure=structure, layerwise="uniform")
            algorithm = MWandaAlgorithm(config)
            stats = algorithm.new_statistic(x.shape[1], 3, torch.device("cpu"))
            stats.update(x, language)
            (new,) = algorithm.prune_group("m", [weight], stats, None, 0.5)
            mask = new == 0
            assert float(mask.float().mean()) == pytest.approx(0.5, abs=0.02)
            if structure == "2:4":
                assert (mask.reshape(16, -1, 4).sum(-1) == 2).all()
            residual = (held_out @ (weight - new).t()).pow(2)
            errors[rank, structure] = [float(residual[held_language == lang].mean()) for lang in range(3)]
    for structure in ("unstructured", "2:4"):
        assert all(low < high for low, high in zip(errors[6, structure], errors[0, structure]))


def test_compensation_rank_is_validated():
    from optimum_mwanda.configuration import MWandaConfig

    with pytest.raises(ValueError, match="compensation_rank"):
        MWandaConfig(compensation_rank=-1)
    with pytest.raises(ValueError, match="needs a compensation"):
        MWandaConfig(compensation_rank=8, mean_compensation="none")
