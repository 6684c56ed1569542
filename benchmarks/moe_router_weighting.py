"""Router-weighted vs plain expert statistics (and every expert on every token) on the tiny MoE test models.

For each fused layout and seed: prune a copy at 50% with Wanda and SparseGPT under each expert option and
measure the loss of the pruned model against the dense model's next-token distribution (KL divergence of
the logits, mean over held-out tokens; lower is better). Random tiny models: a check of direction, not a
claim about real checkpoints.

    python benchmarks/moe_router_weighting.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import MOE_ARCHITECTURES, make_moe_model, make_token_calibration  # noqa: E402

from optimum_mwanda import ExpertOptions, Pruner, SparseGPTConfig, WandaConfig  # noqa: E402

OPTIONS = {
    "router-weighted": ExpertOptions(router_weighted=True, min_tokens=0),
    "unweighted": ExpertOptions(router_weighted=False, min_tokens=0),
    "all-experts": ExpertOptions(calibrate_all_experts=True),
}


def kl(dense_logits: torch.Tensor, logits: torch.Tensor) -> float:
    p = torch.log_softmax(dense_logits.float(), -1)
    q = torch.log_softmax(logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    heldout = torch.cat(list(make_token_calibration(n=4, seq_len=32, seed=99).values()))
    results: dict[tuple[str, str], list[float]] = {}
    for method, config in (
        ("wanda", WandaConfig(sparsity=0.5)),
        ("sparsegpt", SparseGPTConfig(sparsity=0.5)),
    ):
        for architecture in MOE_ARCHITECTURES:
            for seed in range(3):
                dense = make_moe_model(architecture, seed=seed)
                with torch.no_grad():
                    reference = dense(heldout).logits
                calibration = make_token_calibration(n=8, seq_len=32, seed=seed)
                for name, options in OPTIONS.items():
                    model = copy.deepcopy(dense)
                    Pruner(config).prune_model(model, calibration, show_progress=False, experts=options)
                    with torch.no_grad():
                        value = kl(reference, model(heldout).logits)
                    results.setdefault((method, name), []).append(value)
                    print(f"{method:9s} {architecture:12s} seed {seed} {name:16s} KL {value:.4f}", flush=True)
    print("\nmean KL to the dense model over layouts and seeds (lower is better):")
    for (method, name), values in results.items():
        print(f"  {method:9s} {name:16s} {statistics.mean(values):.4f}  (n={len(values)})")
    for method in ("wanda", "sparsegpt"):
        w, u = results[(method, "router-weighted")], results[(method, "unweighted")]
        print(f"  {method}: router-weighted lower in {sum(a < b for a, b in zip(w, u))}/{len(w)} runs")


if __name__ == "__main__":
    main()
