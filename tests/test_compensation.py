"""Mean-shift compensation: the closed form, its invariants and its effect on synthetic multilingual data."""

import pytest
import torch

from optimum_mwanda.methods import (
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
