"""What each process of the data-parallel tests runs (spawned by tests/test_distributed.py).

Every case prunes a fresh tiny model; the parent runs the same cases in one process (no process group) and
compares. Results travel back as files that the test harness (not the package) writes.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from pathlib import Path

import torch
from tiny_models import make_model, make_moe_model, make_token_calibration

from optimum_mwanda import CalibrationSet, ExpertOptions, MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda.distributed import run_on_main_process, synchronise_weights

ARCHITECTURES = ("llama", "gemma3")


def _uneven_calibration() -> dict[str, torch.Tensor]:
    """3 languages with 3, 1 and 2 sequences: one language has fewer sequences than two ranks."""
    calibration = make_token_calibration(n=3, seq_len=16)
    calibration["de"] = calibration["de"][:1]
    calibration["sw"] = calibration["sw"][:2]
    return calibration


def _padded_calibration() -> CalibrationSet:
    """Right-padded sequences of unequal lengths: the statistics see each sequence's valid tokens only."""
    calibration = _uneven_calibration()
    ids = torch.cat(list(calibration.values()))
    languages = [lang for lang, rows in calibration.items() for _ in range(len(rows))]
    lengths = torch.tensor([16, 9, 13, 16, 5, 11])[: len(ids)]
    mask = (torch.arange(16).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return CalibrationSet(ids.masked_fill(mask == 0, 0), mask, languages)


def _grouped_calibration() -> CalibrationSet:
    """25 right-padded sequences (10 en, 7 de, 8 sw): the Hessian multiplies groups of 3 consecutive
    sequences (``sequence_group_for(25)``), 9 groups with a last one of a single sequence, so the ranks are
    dealt whole groups and batches of 2 cut across them."""
    counts = {"en": 10, "de": 7, "sw": 8}
    tokens = make_token_calibration(tuple(counts), n=10, seq_len=16, seed=3)
    ids = torch.cat([tokens[lang][:n] for lang, n in counts.items()])
    languages = [lang for lang, n in counts.items() for _ in range(n)]
    lengths = 6 + torch.arange(len(ids)) * 7 % 11
    mask = (torch.arange(16).unsqueeze(0) < lengths.unsqueeze(1)).long()
    return CalibrationSet(ids.masked_fill(mask == 0, 0), mask, languages)


def cases() -> dict[str, dict]:
    """name -> what to prune and how."""
    out: dict[str, dict] = {}
    for arch in ARCHITECTURES:
        out[f"{arch}-wanda"] = dict(arch=arch, config=WandaConfig(sparsity=0.5, batch_size=2))
        out[f"{arch}-mwanda"] = dict(arch=arch, config=MWandaConfig(sparsity=0.5, batch_size=2))
        out[f"{arch}-sparsegpt"] = dict(
            arch=arch, config=SparseGPTConfig(sparsity=0.5, batch_size=2, block_size=16)
        )
    # Signal pass (CWL), N:M and negative calibration, on one architecture.
    out["llama-mwanda-cwl"] = dict(arch="llama", config=MWandaConfig(sparsity=0.5, layerwise="cwl"))
    out["llama-wanda-owl-negative"] = dict(
        arch="llama", config=WandaConfig(sparsity=0.5, layerwise="owl", batch_size=1), negative=True
    )
    out["llama-sparsegpt-2:4"] = dict(
        arch="llama", config=SparseGPTConfig(mask_structure="2:4", block_size=16, batch_size=3)
    )
    # Padding: per-sequence products (M-Wanda's sketch, SparseGPT's X^T X) need the sequence boundaries.
    out["llama-mwanda-padded"] = dict(arch="llama", config=MWandaConfig(sparsity=0.5), padded=True)
    out["llama-sparsegpt-padded"] = dict(arch="llama", config=SparseGPTConfig(block_size=16), padded=True)
    # M-Wanda's N:M default: the sweep on every 4th token of each sequence, padded.
    out["llama-mwanda-2:4-padded"] = dict(
        arch="llama", config=MWandaConfig(mask_structure="2:4"), padded=True
    )
    # Sequences multiplied in groups (the Hessian's float32 products of 3 sequences each, summed in float64).
    out["llama-sparsegpt-grouped"] = dict(
        arch="llama", config=SparseGPTConfig(block_size=16, batch_size=2), grouped=True
    )
    out["llama-mwanda-2:4-grouped"] = dict(
        arch="llama", config=MWandaConfig(mask_structure="2:4", batch_size=2), grouped=True
    )
    # A single sequence: the second rank has no calibration data at all.
    out["llama-wanda-one-sequence"] = dict(arch="llama", config=WandaConfig(sparsity=0.5), single=True)
    out["llama-sparsegpt-one-sequence"] = dict(
        arch="llama", config=SparseGPTConfig(block_size=16), single=True
    )
    # Mixtures of experts: expert statistics and routing counts summed like linear ones; the fallback pass
    # for rare experts (its statistics summed on their own); a rank without data.
    out["qwen3_moe-mwanda-padded"] = dict(
        arch="qwen3_moe", moe=True, config=MWandaConfig(sparsity=0.5), padded=True
    )
    out["mixtral-sparsegpt-fallback"] = dict(
        arch="mixtral",
        moe=True,
        config=SparseGPTConfig(block_size=16, batch_size=2),
        experts=ExpertOptions(min_tokens=12),
    )
    out["deepseek_v3-wanda-one-sequence"] = dict(
        arch="deepseek_v3", moe=True, config=WandaConfig(sparsity=0.5), single=True
    )
    return out


def calibration_for(case: dict) -> dict[str, torch.Tensor] | CalibrationSet:
    if case.get("padded"):
        return _padded_calibration()
    if case.get("grouped"):
        return _grouped_calibration()
    if case.get("single"):
        return {"en": make_token_calibration(("en",), n=1, seq_len=16)["en"]}
    return _uneven_calibration()


def prune_case(case: dict, **kwargs) -> dict[str, torch.Tensor]:
    build = make_moe_model if case.get("moe") else make_model
    model = build(case["arch"], seed=case.get("seed", 0))
    if "experts" in case:
        kwargs = {**kwargs, "experts": case["experts"]}
    negative = None
    if case.get("negative"):
        negative = {"code": torch.randint(200, 300, (3, 16), generator=torch.Generator().manual_seed(5))}
    Pruner(case["config"]).prune_model(
        model, calibration_for(case), negative_calibration=negative, show_progress=False, **kwargs
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write(path: Path, value) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    torch.save(value, tmp)
    os.replace(tmp, path)


# -- jobs ---------------------------------------------------------------------------------------------
def job_equivalence(rank: int, out: Path) -> None:
    results = {name: prune_case(case) for name, case in cases().items()}
    _write(out / f"rank{rank}.pt", results)


def job_mismatch(rank: int, out: Path) -> None:
    """Rank 1 loads another model (then another calibration set): both ranks must refuse, unchanged."""
    outcome = {}
    for what in ("model", "calibration"):
        model = make_model("llama", seed=1 if (rank == 1 and what == "model") else 0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        calibration = _uneven_calibration()
        if rank == 1 and what == "calibration":
            calibration["en"] = calibration["en"].flip(0)
        try:
            Pruner(WandaConfig(sparsity=0.5)).prune_model(model, calibration, show_progress=False)
            error = None
        except Exception as err:  # recorded for the parent to check
            error = f"{type(err).__name__}: {err}"
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        outcome[what] = {"error": error, "unchanged": unchanged}
    _write(out / f"rank{rank}.pt", outcome)


def job_writes(rank: int, out: Path) -> None:
    """Checkpointed run plus save_pretrained into shared folders; record every write this rank makes."""
    shared = out / "shared"
    events: list[tuple[str, str]] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, os.PathLike)):
            path, mode = str(args[0]), str(args[1] or "r")
            if path.startswith(str(shared)) and any(c in mode for c in "wax+"):
                events.append((event, path))
        elif event in ("os.rename", "os.mkdir", "os.remove", "shutil.rmtree"):
            if str(args[0]).startswith(str(shared)):
                events.append((event, str(args[0])))

    sys.addaudithook(audit)
    case = dict(arch="llama", config=MWandaConfig(sparsity=0.5, batch_size=2))
    model = make_model("llama")
    pruner = Pruner(case["config"])
    pruner.prune_model(
        model, _uneven_calibration(), show_progress=False, checkpoint_dir=shared / "checkpoint"
    )
    saved = pruner.save_pretrained(model, shared / "saved")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # A write failing on rank 0 must fail the other ranks too, not leave them waiting.
    def failing_write():
        raise OSError("disk full (simulated)")

    try:
        run_on_main_process(failing_write)
        failure = None
    except Exception as err:  # recorded for the parent
        failure = f"{type(err).__name__}: {err}"
    # Weights that differ between ranks are replaced by rank 0's; equal ones are left alone.
    differing = [torch.full((3, 4), float(rank)), torch.ones(2)]
    synchronised = (synchronise_weights(differing), synchronise_weights([torch.ones(5)]), differing)
    _write(
        out / f"rank{rank}.pt",
        {
            "events": events,
            "saved": str(saved),
            "weights": weights,
            "failure": failure,
            "synchronised": synchronised,
        },
    )


class _Interrupt(RuntimeError):
    pass


def job_resume(rank: int, out: Path) -> None:
    """A checkpointed run interrupted in layer 2 on every rank, resumed on fresh models."""
    checkpoint = out / "shared" / "checkpoint"
    results = {}
    for name in ("llama-mwanda", "llama-sparsegpt"):
        case = cases()[name]
        model = make_model("llama")

        def interrupt(*_):
            raise _Interrupt("simulated crash")

        handle = model.model.layers[2].register_forward_pre_hook(interrupt)
        try:
            Pruner(case["config"]).prune_model(
                model, calibration_for(case), show_progress=False, checkpoint_dir=checkpoint / name
            )
        except _Interrupt:
            pass
        handle.remove()
        model = make_model("llama")
        pruner = Pruner(case["config"])
        pruner.prune_model(
            model, calibration_for(case), show_progress=False, checkpoint_dir=checkpoint / name
        )
        results[name] = {
            "resumed_from_layer": pruner.report.resumed_from_layer,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        }
    _write(out / f"rank{rank}.pt", results)


def job_refusals(rank: int, out: Path) -> None:
    """A rank that fails validation (token ids beyond the vocabulary on rank 1), then ``checkpoint_dir`` given
    on rank 0 only: every rank must raise promptly, none may wait in a collective for another."""
    outcome = {}
    for what in ("validation", "checkpoint"):
        model = make_model("llama")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        calibration = _uneven_calibration()
        kwargs = {}
        if what == "validation" and rank == 1:
            calibration["de"] = calibration["de"] + 10_000
        if what == "checkpoint" and rank == 0:
            kwargs["checkpoint_dir"] = out / "shared" / "checkpoint"
        start = time.monotonic()
        try:
            Pruner(WandaConfig(sparsity=0.5)).prune_model(model, calibration, show_progress=False, **kwargs)
            error = None
        except Exception as err:  # recorded for the parent to check
            error = f"{type(err).__name__}: {err}"
        unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        outcome[what] = {"error": error, "unchanged": unchanged, "seconds": time.monotonic() - start}
    outcome["checkpoint_dir_created"] = (out / "shared" / "checkpoint").exists()
    _write(out / f"rank{rank}.pt", outcome)


JOBS = {
    "equivalence": job_equivalence,
    "mismatch": job_mismatch,
    "writes": job_writes,
    "resume": job_resume,
    "refusals": job_refusals,
}


def job_all(rank: int, out: Path) -> None:
    """Every job in one process group: starting processes (importing torch and transformers) is the slow
    part, so the tests spawn once."""
    for name, job in JOBS.items():
        if job is job_all or name in SEPARATE_JOBS:
            continue
        (out / name).mkdir(exist_ok=True)
        job(rank, out / name)


JOBS["all"] = job_all
#: jobs that a broken build could hang: spawned on their own, with a deadline (tests/test_distributed.py)
SEPARATE_JOBS = ("refusals",)


def run(
    rank: int, world_size: int, init_file: str, job: str, out: str, timeout_s: float | None = None
) -> None:
    """``torch.multiprocessing.spawn`` target: join the gloo group, run ``job``, leave. ``timeout_s`` bounds
    every collective (gloo's default is 30 minutes)."""
    torch.set_num_threads(1)
    kwargs = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s is not None else {}
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, **kwargs
    )
    try:
        JOBS[job](rank, Path(out))
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        torch.distributed.destroy_process_group()
