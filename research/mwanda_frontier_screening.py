"""Screening, round 3 (issue: M-Wanda at the frontier): masks and kept-weight updates beyond the means.

Round 2 (``mwanda_update_screening.py``) found that restoring each row's per-language mean output is what
makes M-Wanda beat Wanda, and that a fixed-mask OBS update with the full input Gram matrix would be far
better still (0.77x Wanda at 50%) at SparseGPT's cost. This round screens what lies between, with dense
statistics collected once (a screen; winners are confirmed with the sequential pruner in the study):

* ``lowrank-r``: the closed-form update of :func:`optimum_mwanda.parts.low_rank_compensation` with the
  input second moment modelled as the per-language means plus the top ``r`` principal directions of the
  pooled within-language covariance plus a diagonal (``r = 0`` is today's M-Wanda compensation);
* ``centred``: the mask scored on ``|W_ij| * sqrt(within-language variance_j)`` instead of Wanda's
  ``|W_ij| * ||X_j||``, since the mean part of every input is restored by the update anyway;
* ``ria``: RIA's relative importance ``(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||^0.5``;
* references: the fixed-mask OBS update (full Gram) and SparseGPT;
* round 4 (N:M): SparseGPT's sweep on the low-rank H, non-sequential OBS scores, and SparseGPT on the
  Gram matrix of every 4th / 8th / 16th token;
* round 5 (languages absent from calibration, ``--absent``): stronger ridges on both updates, so that
  what they fit to the calibration languages transfers to others; equal language weights.

Usage: ``nice -n 5 python research/mwanda_frontier_screening.py [--sparsity 0.5 0.6 2:4] [--only ...]``
(writes ``research/results/mwanda_frontier_screening.{json,md}``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import screening  # noqa: E402
from mwanda_update_screening import collect, fixed_mask_obs  # noqa: E402

from optimum_mwanda.configuration import parse_mask_structure  # noqa: E402
from optimum_mwanda.evaluation import geometric_mean  # noqa: E402
from optimum_mwanda.parts import mask_from_scores, sparsegpt_prune, wanda_scores  # noqa: E402
from optimum_mwanda.parts.compensation import (  # noqa: E402
    covariance_factors,
    low_rank_compensation,
    mean_shift_compensation,
)

MAX_RANK = 128


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sparsity", nargs="+", default=["0.5", "0.6", "2:4"])
    screening.add_screening_arguments(parser, threads=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--absent", nargs="*", default=[], help="held-out languages absent from calibration, also evaluated"
    )
    parser.add_argument(
        "--only", nargs="*", help="run only variants whose name contains one of these, in this order"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="file to keep the dense statistics in between runs (a screen is slow)",
    )
    parser.add_argument("--output", type=Path, default=screening.RESULTS / "mwanda_frontier_screening")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = screening.load_screening_data(
        args.samples_per_language, seed=args.seed, absent_languages=args.absent
    )
    t = time.perf_counter()
    cached = (
        torch.load(args.cache, weights_only=False) if args.cache is not None and args.cache.exists() else None
    )
    if cached is None:
        modules, stats = collect(data.model, data.calibration, with_gram=True)
    else:
        modules = screening.prunable_modules(data.model)
        stats = cached["stats"]
    print(f"[screen3] dense statistics in {time.perf_counter() - t:.0f} s", flush=True)
    originals = {m.name: m.read_weight().clone() for m in modules}
    distinct = {id(s): s for s in stats.values()}

    # Per shared-input statistic: pooled within-language covariance and its top principal directions.
    t = time.perf_counter()
    derived: dict[int, dict[str, torch.Tensor]] = {}
    for position, s in enumerate(distinct.values()):
        if cached is not None:
            derived[id(s)] = cached["derived"][position]
            continue
        shares = s.tokens / s.tokens.sum()
        mu = s.language_means
        gram = s.gram / s.tokens.sum()
        covariance = gram - (mu.t() * shares) @ mu
        evals, evecs = torch.linalg.eigh(covariance.float())
        order = torch.argsort(evals, descending=True)[:MAX_RANK]
        within = torch.diagonal(covariance).clamp_min(0.0)
        derived[id(s)] = {
            "shares": shares.float(),
            "mu": mu.float(),
            "within": within.float(),
            "evals": evals[order].float(),
            "evecs": evecs[:, order].float(),
        }
    if args.cache is not None and cached is None:
        torch.save({"stats": stats, "derived": [derived[id(s)] for s in distinct.values()]}, args.cache)
    print(f"[screen3] eigendecompositions in {time.perf_counter() - t:.0f} s", flush=True)

    def wanda_score(w, s):
        return wanda_scores(w, s.pooled_norm)

    def centred_score(w, s):
        return wanda_scores(w, derived[id(s)]["within"].sqrt())

    def ria_score(w, s):
        a = w.abs().float()
        relative = a / a.sum(dim=0, keepdim=True).clamp_min(1e-12) + a / a.sum(dim=1, keepdim=True).clamp_min(
            1e-12
        )
        return relative * s.pooled_norm.pow(0.5).unsqueeze(0)

    def no_update(w, mask, s):
        return w.float().masked_fill(mask, 0.0)

    def mean_comp(w, mask, s):
        d = derived[id(s)]
        return mean_shift_compensation(w, mask, d["mu"], s.language_second_moments.float(), d["shares"])

    def low_rank(rank, damping):
        def update(w, mask, s):
            d = derived[id(s)]
            factors, diagonal = covariance_factors(
                d["mu"], d["shares"], d["evecs"][:, :rank], d["evals"][:rank], d["within"], damping
            )
            return low_rank_compensation(w, mask, factors, diagonal)

        return update

    def obs(w, mask, s):
        return fixed_mask_obs(w, mask, s.gram.float())

    def low_rank_hessian(s, rank):
        # H ~ D + U U^T from the same factors as the low-rank update, as a dense in x in matrix.
        d = derived[id(s)]
        factors, diagonal = covariance_factors(
            d["mu"], d["shares"], d["evecs"][:, :rank], d["evals"][:rank], d["within"]
        )
        hessian = factors @ factors.t()
        hessian.diagonal().add_(diagonal)
        return hessian

    def sweep(rank):
        # Round 4: SparseGPT's column sweep (masks chosen inside it, seeing the updates) on the low-rank
        # H instead of the full Gram matrix: the mask knows the kept weights will be compensated.
        def prune(w, s, sparsity, nm):
            new, _ = sparsegpt_prune(w, low_rank_hessian(s, rank), sparsity, nm=nm)
            return new

        return prune

    def obs_score(rank):
        # Non-sequential OBS saliency w_ij^2 / [H^-1]_jj under H = D + U U^T (Woodbury for the diagonal):
        # a feature the others can stand in for (small 1 / [H^-1]_jj) is cheaper to prune once the kept
        # weights are compensated. rank=None: the full Gram matrix, for reference.
        def score(w, s):
            if rank is None:
                gram = s.gram.float() / float(s.tokens.sum())
                gram.diagonal().add_(0.01 * float(gram.diagonal().mean()))
                inv_diag = torch.diagonal(torch.linalg.inv(gram))
            else:
                d = derived[id(s)]
                u, diagonal = covariance_factors(
                    d["mu"], d["shares"], d["evecs"][:, :rank], d["evals"][:rank], d["within"]
                )
                inv_d = 1.0 / diagonal
                scaled = u * inv_d.unsqueeze(1)
                core = torch.eye(u.shape[1]) + u.t() @ scaled
                inv_diag = inv_d - (scaled @ torch.linalg.inv(core) * scaled).sum(1)
            return w.float().pow(2) / inv_diag.unsqueeze(0)

        return score

    def low_rank_equal_shares(rank):
        # Every calibration language weighs the same in the objective, whatever its token count.
        def update(w, mask, s):
            d = derived[id(s)]
            equal = torch.full_like(d["shares"], 1.0 / len(d["shares"]))
            factors, diagonal = covariance_factors(
                d["mu"], equal, d["evecs"][:, :rank], d["evals"][:rank], d["within"]
            )
            return low_rank_compensation(w, mask, factors, diagonal)

        return update

    def low_rank_diagonal_ridge(rank, relative):
        # The closed form's counterpart of the sweep's relative ridge: add ``relative`` times H's own
        # diagonal (the factors' squared row norms plus D) to D.
        def update(w, mask, s):
            d = derived[id(s)]
            factors, diagonal = covariance_factors(
                d["mu"], d["shares"], d["evecs"][:, :rank], d["evals"][:rank], d["within"]
            )
            diagonal = diagonal + relative * (factors.pow(2).sum(1) + diagonal)
            return low_rank_compensation(w, mask, factors, diagonal)

        return update

    def ridged_sweep(stride, relative=0.0, dampening=0.01):
        # Round 5: SparseGPT's sweep on the Gram matrix of every stride-th token with a stronger ridge.
        # ``relative`` adds that share of each feature's own diagonal (shrinking the off-diagonal
        # structure fitted to the calibration languages towards the diagonal, where the sweep is Wanda);
        # ``dampening`` is SparseGPT's isotropic ridge (a share of the mean diagonal).
        def prune(w, s, sparsity, nm):
            gram = s.subsampled_grams[stride].float() if stride > 1 else s.gram.float()
            gram = gram + torch.diag(relative * torch.diagonal(gram))
            new, _ = sparsegpt_prune(w, gram, sparsity, nm=nm, dampening=dampening)
            return new

        return prune

    def sweep_mask_then(update):
        def prune(w, s, sparsity, nm):
            swept, _ = sparsegpt_prune(w, low_rank_hessian(s, 32), sparsity, nm=nm)
            return update(w, swept == 0, s)

        return prune

    def subsampled_sparsegpt(stride):
        # SparseGPT on the Gram matrix of every stride-th token only: 1/stride of the Hessian's cost.
        def prune(w, s, sparsity, nm):
            new, _ = sparsegpt_prune(w, s.subsampled_grams[stride].float(), sparsity, nm=nm)
            return new

        return prune

    variants = {
        "wanda": (wanda_score, no_update),
        "wanda + mean-comp (M-Wanda r=0)": (wanda_score, mean_comp),
        "wanda + lowrank r=8": (wanda_score, low_rank(8, 0.0)),
        "wanda + lowrank r=32": (wanda_score, low_rank(32, 0.0)),
        "wanda + lowrank r=32 damp=0.01": (wanda_score, low_rank(32, 0.01)),
        "wanda + lowrank r=128": (wanda_score, low_rank(128, 0.0)),
        "centred + mean-comp": (centred_score, mean_comp),
        "centred + lowrank r=32": (centred_score, low_rank(32, 0.0)),
        "ria": (ria_score, no_update),
        "ria + mean-comp": (ria_score, mean_comp),
        "wanda + fixed-mask OBS": (wanda_score, obs),
        "sparsegpt": (None, None),
        "lowrank-H sweep r=32": (None, sweep(32)),
        "lowrank-H sweep r=8": (None, sweep(8)),
        "lowrank-H sweep r=128": (None, sweep(128)),
        "ria + lowrank r=32": (ria_score, low_rank(32, 0.0)),
        "obs-diag r=32 + lowrank r=32": (obs_score(32), low_rank(32, 0.0)),
        "obs-diag full + fixed-mask OBS": (obs_score(None), obs),
        "obs-diag full + lowrank r=32": (obs_score(None), low_rank(32, 0.0)),
        "sweep-r32 mask + lowrank r=32": (None, sweep_mask_then(low_rank(32, 0.0))),
        "sparsegpt, Gram of 1/4 tokens": (None, subsampled_sparsegpt(4)),
        "sparsegpt, Gram of 1/8 tokens": (None, subsampled_sparsegpt(8)),
        "sparsegpt, Gram of 1/16 tokens": (None, subsampled_sparsegpt(16)),
        "wanda + lowrank r=32 damp=0.1": (wanda_score, low_rank(32, 0.1)),
        "wanda + lowrank r=32 damp=0.3": (wanda_score, low_rank(32, 0.3)),
        "wanda + lowrank r=32 damp=1": (wanda_score, low_rank(32, 1.0)),
        "wanda + lowrank r=32 equal shares": (wanda_score, low_rank_equal_shares(32)),
        "sweep 1/4, relative ridge 0.1": (None, ridged_sweep(4, relative=0.1)),
        "wanda + lowrank r=32 relative ridge 0.1": (wanda_score, low_rank_diagonal_ridge(32, 0.1)),
        "wanda + lowrank r=32 relative ridge 0.3": (wanda_score, low_rank_diagonal_ridge(32, 0.3)),
        "wanda + lowrank r=32 relative ridge 1": (wanda_score, low_rank_diagonal_ridge(32, 1.0)),
        "sparsegpt, relative ridge 0.3": (None, ridged_sweep(1, relative=0.3)),
        "sweep 1/4, relative ridge 0.3": (None, ridged_sweep(4, relative=0.3)),
        "sweep 1/4, relative ridge 1": (None, ridged_sweep(4, relative=1.0)),
        "sweep 1/4, dampening 0.1": (None, ridged_sweep(4, dampening=0.1)),
        "sweep 1/4, dampening 1": (None, ridged_sweep(4, dampening=1.0)),
    }

    results = screening.load_results(args.output)
    for target in args.sparsity:
        nm = parse_mask_structure(target) if ":" in target else None
        sparsity = 1 - nm[0] / nm[1] if nm else float(target)
        names = [n for o in args.only for n in variants if o == n] if args.only else list(variants)
        for name in names:
            score, update = variants[name]
            key = f"{target} | {name}"
            if key in results:
                continue
            t = time.perf_counter()
            for m in modules:
                weight, s = originals[m.name], stats[m.name]
                if score is None and update is not None:
                    new = update(weight, s, sparsity, nm)
                elif score is None:
                    new, _ = sparsegpt_prune(weight, s.gram.float(), sparsity, nm=nm)
                else:
                    mask = mask_from_scores(score(weight, s), sparsity, nm)
                    new = update(weight, mask, s)
                m.write_weight(new.to(weight.dtype))
            seconds = time.perf_counter() - t
            ppl, geo = screening.score_and_restore(data, modules, originals, args.max_windows)
            results[key] = {"perplexity": ppl, "geomean": geo, "update_seconds": seconds}
            absent = (
                f", absent {geometric_mean(ppl[lang] for lang in args.absent):8.2f}" if args.absent else ""
            )
            print(f"[screen3] {target} {name:34s} geomean {geo:8.2f}{absent} ({seconds:.1f} s)", flush=True)
            _write(args, results)
    _write(args, results)


def _write(args, results) -> None:
    record = {
        "command": "python research/mwanda_frontier_screening.py " + " ".join(sys.argv[1:]),
        "load_average": os.getloadavg(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    lines = [
        "# Screening round 3: masks and kept-weight updates beyond the means (dense statistics, one-shot)",
        "",
        f"Calibration: 7 languages x {args.samples_per_language} x 512 tokens of the bundled corpus (seed "
        f"{args.seed}); held-out: {args.max_windows} windows of 512 tokens per language; uniform schedule. "
        + (
            f"Starred columns: languages absent from calibration ({' '.join(args.absent)}). "
            if args.absent
            else ""
        )
        + "A screen, not the final numbers: statistics of the dense model, every module pruned at once. "
        f"Load average at the last write: {' '.join(f'{v:.2f}' for v in os.getloadavg())} (2 cores, shared).",
        "",
        *screening.table_head(
            [
                ("sparsity", "---"),
                ("variant", "---"),
                ("geomean", "---:"),
                ("vs Wanda", "---:"),
                ("update s", "---:"),
            ]
        ),
    ]
    if args.absent:
        lines[-2] += "".join(f" {lang}* |" for lang in args.absent) + " absent geomean* |"
        lines[-1] += "---:|" * (len(args.absent) + 1)
    for key, res in results.items():
        target, name = key.split(" | ")
        cells = [
            target,
            name,
            f"{res['geomean']:.2f}",
            screening.versus_wanda(results, key),
            f"{res['update_seconds']:.1f}",
        ]
        row = screening.table_row(cells, res)
        if args.absent:
            absent = [res["perplexity"].get(lang) for lang in args.absent]
            row += "".join(f" {v:.1f} |" if v is not None else " - |" for v in absent)
            row += f" {geometric_mean(absent):.1f} |" if None not in absent else " - |"
        lines.append(row)
    screening.write_results(args.output, record, lines)


if __name__ == "__main__":
    main()
