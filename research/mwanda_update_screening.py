"""Screening, round 2: sparsity allocation and cheap weight compensation on top of M-Wanda/Wanda masks.

Round 1 (``mwanda_screening.py``) showed that re-weighting Wanda's feature norm with language-aware terms
moves held-out perplexity by less than the noise. This round screens the other two levers, with dense
statistics collected once (a screen; winners are confirmed with the sequential pruner in the study):

* allocation: attention vs MLP sparsity, and a depth ramp, at the same parameter-weighted mean sparsity;
* compensation of the kept weights after masking, without SparseGPT's column sweep:
  - mean-shift compensation: the pruned weights' expected contribution to each output row is put back on
    the kept weights, under a model where inputs are a (per-language) mean plus independent noise;
  - per-row rescaling of the kept weights (least squares with the input Gram matrix);
* references: a fixed-mask OBS update (SparseGPT's sweep with the Wanda mask) and SparseGPT itself.

Usage: ``python research/mwanda_update_screening.py [--sparsity 0.5 0.6] [--only NAME ...]``
(writes ``research/results/mwanda_update_screening.{json,md}``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import screening
import torch

from optimum_mwanda.modeling import LayerStatisticsCollector
from optimum_mwanda.parts import mask_from_scores, sparsegpt_prune, wanda_scores
from optimum_mwanda.parts.sparsegpt import inverse_hessian_cholesky

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


class ScreenStatistics:
    """Per-language first and second moments, activation counts (threshold 3) and the pooled Gram matrix."""

    def __init__(self, in_features: int, num_languages: int, with_gram: bool):
        self.sum = torch.zeros(num_languages, in_features, dtype=torch.float64)
        self.sum_squares = torch.zeros(num_languages, in_features, dtype=torch.float64)
        self.active = torch.zeros(num_languages, in_features, dtype=torch.float64)
        self.tokens = torch.zeros(num_languages, dtype=torch.float64)
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64) if with_gram else None
        # Gram matrices of every k-th token only: what a token-subsampled Hessian would see.
        self.subsampled_grams = {k: torch.zeros_like(self.gram) for k in (4, 8, 16)} if with_gram else {}

    def update(
        self, x: torch.Tensor, language: torch.Tensor, sequence_lengths: int | list[int] | None = None
    ) -> None:
        # sequence_lengths (what the hooks pass for per-sequence float32 sums) is not needed here: a
        # screen sums the whole batch at once.
        x = x.float()
        self.sum.index_add_(0, language, x.double())
        squares = x * x
        self.sum_squares.index_add_(0, language, squares.double())
        rms = squares.mean(dim=1, keepdim=True).sqrt()
        self.active.index_add_(0, language, (x.abs() > 3.0 * rms).double())
        self.tokens.index_add_(0, language, torch.ones_like(language, dtype=torch.float64))
        if self.gram is not None:
            self.gram.add_((x.t() @ x).double())
            for stride, gram in self.subsampled_grams.items():
                sample = x[::stride]
                gram.add_((sample.t() @ sample).double())

    @property
    def count(self) -> torch.Tensor:
        return self.tokens.clamp_min(1.0).unsqueeze(1)

    @property
    def pooled_norm(self) -> torch.Tensor:
        return (self.sum_squares.sum(0) / self.tokens.sum()).sqrt().float()

    @property
    def language_means(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def language_second_moments(self) -> torch.Tensor:
        return self.sum_squares / self.count

    @property
    def activation_probability(self) -> torch.Tensor:
        return self.active / self.count


def collect(model, calibration, with_gram: bool, groups: str = "language", batch_size: int = 4):
    modules = screening.prunable_modules(model)
    # groups="sequence" treats every calibration sequence as its own group (finer means than languages).
    index = calibration.language_index if groups == "language" else torch.arange(len(calibration))
    n_lang = int(index.max()) + 1
    collector = LayerStatisticsCollector(modules, lambda n, device: ScreenStatistics(n, n_lang, with_gram))
    screening.forward_calibration(model, calibration, [collector], index, batch_size)
    return modules, {m.name: collector.statistic_for(m) for m in modules}


# -- compensation maths (candidates for optimum_mwanda.parts) ------------------------------------------


def mean_shift_compensation(
    weight: torch.Tensor,
    mask: torch.Tensor,
    means: torch.Tensor,
    second_moments: torch.Tensor,
    language_shares: torch.Tensor,
) -> torch.Tensor:
    """Kept-weight update that restores each row's expected output per language.

    Model: ``x = mu_l + noise`` for language ``l`` (share ``pi_l``), noise independent per feature with
    variance ``v_j``. The output error of row ``i`` after pruning is ``e = sum_P w x - sum_K delta x``;
    minimising ``E[e^2]`` over ``delta`` (kept entries only) is a ridge regression:
    ``delta = V^-1 M^T (M V^-1 M^T + Pi^-1)^-1 Delta`` with ``M`` the per-language means of the kept
    features and ``Delta_l`` the pruned weights' mean contribution in language ``l``.
    """
    w = weight.double()
    keep = (~mask).double()
    mu = means.double()  # [L, in]
    variance = (second_moments.double() - mu.pow(2)).clamp_min(0.0)
    pooled_var = (variance * language_shares.double().unsqueeze(1)).sum(0)
    # Features with (numerically) no noise would get infinite freedom: floor at a small share of the mean.
    inv_v = 1.0 / pooled_var.clamp_min(1e-6 * float(pooled_var.mean()) + 1e-12)
    shift = (w * mask.double()) @ mu.t()  # [out, L]
    n_lang = mu.shape[0]
    basis = (mu.unsqueeze(1) * mu.unsqueeze(0) * inv_v).reshape(n_lang * n_lang, -1)  # [L*L, in]
    system = (keep @ basis.t()).reshape(-1, n_lang, n_lang)  # [out, L, L]
    system = system + torch.diag(1.0 / language_shares.double().clamp_min(1e-12))
    lam = torch.linalg.solve(system, shift.unsqueeze(-1)).squeeze(-1)  # [out, L]
    delta = keep * ((lam @ mu) * inv_v)
    return (w * keep + delta).to(weight.dtype)


def row_rescale(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Scale each row's kept weights by ``alpha = w^T G w' / w'^T G w'`` (least squares on the output)."""
    w = weight.double()
    pruned = w.masked_fill(mask, 0.0)
    g = gram.double()
    num = ((w @ g) * pruned).sum(1)
    den = ((pruned @ g) * pruned).sum(1).clamp_min(1e-30)
    return (pruned * (num / den).unsqueeze(1)).to(weight.dtype)


def fixed_mask_obs(
    weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, block_size: int = 128, damp: float = 0.01
):
    """SparseGPT's column sweep with a given mask: prune the masked weights and update the later columns."""
    hinv, dead, _ = inverse_hessian_cholesky(gram.float(), damp)
    wt = weight.float().t().contiguous().clone()
    mt = mask.t().contiguous()
    wt[dead] = 0.0
    cols = wt.shape[0]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = wt[start:end].clone()
        hb = hinv[start:end, start:end]
        diag = torch.diagonal(hb).unsqueeze(1)
        errors = torch.empty_like(block)
        for i in range(end - start):
            err = block[i].mul(mt[start + i]).div_(diag[i])
            block[i:].addr_(hb[i, i:], err, alpha=-1.0)
            errors[i] = err
        block.masked_fill_(mt[start:end], 0.0)
        wt[start:end] = block
        wt[end:].addmm_(hinv[start:end, end:].t(), errors, alpha=-1.0)
    return wt.t().contiguous()


# -- allocation ----------------------------------------------------------------------------------------


def weighted_shift(raw: dict[str, float], sizes: dict[str, int], target: float) -> dict[str, float]:
    """Add one constant to every module's sparsity so that the parameter-weighted mean equals ``target``."""
    total = sum(sizes.values())
    mean = sum(raw[n] * sizes[n] for n in raw) / total
    return {n: min(max(raw[n] + target - mean, 0.0), 0.95) for n in raw}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.6])
    screening.add_screening_arguments(parser, threads=2)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--groups", choices=["language", "sequence"], default="language")
    parser.add_argument("--no-gram", action="store_true", help="skip variants that need Gram matrices")
    parser.add_argument("--output", type=Path, default=screening.RESULTS / "mwanda_update_screening")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = screening.load_screening_data(args.samples_per_language)
    t = time.perf_counter()
    modules, stats = collect(data.model, data.calibration, with_gram=not args.no_gram, groups=args.groups)
    print(f"[screen2] dense statistics in {time.perf_counter() - t:.0f} s", flush=True)
    originals = {m.name: m.read_weight().clone() for m in modules}
    sizes = {n: w.numel() for n, w in originals.items()}
    layer_of = {m.name: int(m.name.split(".")[-3]) for m in modules}
    n_layers = max(layer_of.values()) + 1

    def language_shares(s):
        return s.tokens / s.tokens.sum()

    def wanda_imp(s):
        return s.pooled_norm

    def mwanda_imp(s):
        return s.pooled_norm * (1 + 0.25 * s.activation_probability.amax(0).float())

    def uniform(target):
        return {n: target for n in originals}

    def attention_split(delta):
        def schedule(target):
            raw = {n: target + (-delta if n.split(".")[-1] in ATTENTION else 0.0) for n in originals}
            return weighted_shift(raw, sizes, target)

        return schedule

    def depth_ramp(delta):
        def schedule(target):
            raw = {n: target + delta * (2 * layer_of[n] / (n_layers - 1) - 1) for n in originals}
            return weighted_shift(raw, sizes, target)

        return schedule

    def none(weight, mask, s):
        return weight.masked_fill(mask, 0.0)

    def mean_comp(per_language: bool):
        def update(weight, mask, s):
            if per_language:
                return mean_shift_compensation(
                    weight, mask, s.language_means, s.language_second_moments, language_shares(s)
                )
            pooled_mean = (s.sum.sum(0) / s.tokens.sum()).unsqueeze(0)
            pooled_second = (s.sum_squares.sum(0) / s.tokens.sum()).unsqueeze(0)
            return mean_shift_compensation(weight, mask, pooled_mean, pooled_second, torch.ones(1))

        return update

    def rescale(weight, mask, s):
        return row_rescale(weight, mask, s.gram)

    def obs(weight, mask, s):
        return fixed_mask_obs(weight, mask, s.gram)

    variants: dict[str, tuple[Callable, Callable, Callable]] = {
        "wanda": (wanda_imp, uniform, none),
        "mwanda-default": (mwanda_imp, uniform, none),
        "wanda attn-0.1": (wanda_imp, attention_split(0.1), none),
        "wanda attn+0.1": (wanda_imp, attention_split(-0.1), none),
        "wanda ramp+0.05": (wanda_imp, depth_ramp(0.05), none),
        "wanda ramp-0.05": (wanda_imp, depth_ramp(-0.05), none),
        "wanda mean-comp pooled": (wanda_imp, uniform, mean_comp(False)),
        "wanda mean-comp per-language": (wanda_imp, uniform, mean_comp(True)),
        "mwanda-default mean-comp per-language": (mwanda_imp, uniform, mean_comp(True)),
        "wanda mean-comp per-language ramp+0.05": (wanda_imp, depth_ramp(0.05), mean_comp(True)),
        "wanda mean-comp per-language ramp+0.08": (wanda_imp, depth_ramp(0.08), mean_comp(True)),
        "wanda mean-comp per-language ramp+0.12": (wanda_imp, depth_ramp(0.12), mean_comp(True)),
    }
    if args.groups != "language":
        variants = {f"{k} [groups={args.groups}]": v for k, v in variants.items() if "per-language" in k}
    if not args.no_gram:
        variants |= {
            "wanda row-rescale": (wanda_imp, uniform, rescale),
            "wanda + fixed-mask OBS": (wanda_imp, uniform, obs),
            "sparsegpt": (None, uniform, None),
        }

    def run(name, importance, schedule, update, target):
        plan = schedule(target)
        for m in modules:
            weight, s = originals[m.name], stats[m.name]
            if importance is None:
                new, _ = sparsegpt_prune(weight, s.gram.float(), plan[m.name])
                m.write_weight(new.to(weight.dtype))
                continue
            mask = mask_from_scores(wanda_scores(weight, importance(s)), plan[m.name], None)
            m.write_weight(update(weight, mask, s).to(weight.dtype))
        ppl, geo = screening.score_and_restore(data, modules, originals, args.max_windows)
        print(
            f"[screen2] {target} {name:32s} geomean {geo:8.2f}  "
            + " ".join(f"{k}={v:.1f}" for k, v in ppl.items()),
            flush=True,
        )
        return {"perplexity": ppl, "geomean": geo}

    results = screening.load_results(args.output)
    for target in args.sparsity:
        for name, (importance, schedule, update) in variants.items():
            if args.only and name not in args.only:
                continue
            key = f"{target:g} | {name}"
            if key not in results:
                results[key] = run(name, importance, schedule, update, target)
                _write(args, results)
    _write(args, results)


def _write(args, results) -> None:
    record = {
        "command": "python research/mwanda_update_screening.py",
        "settings": vars(args) | {"output": str(args.output)},
        "results": results,
    }
    lines = [
        "# Screening round 2: allocation and cheap compensation (dense statistics, one-shot)",
        "",
        f"Calibration: 7 languages x {args.samples_per_language} x 512 tokens of the bundled corpus; held-out: "
        f"{args.max_windows} windows of 512 tokens per language. A screen, not the final numbers.",
        "",
        *screening.table_head(
            [("sparsity", "---"), ("variant", "---"), ("geomean", "---:"), ("vs Wanda", "---:")]
        ),
    ]
    for key, res in results.items():
        target, name = key.split(" | ")
        lines.append(
            screening.table_row(
                [target, name, f"{res['geomean']:.2f}", screening.versus_wanda(results, key)], res
            )
        )
    screening.write_results(args.output, record, lines)


if __name__ == "__main__":
    main()
