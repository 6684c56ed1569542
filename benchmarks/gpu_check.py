"""GPU check: bfloat16 pruning on CUDA against the CPU float32 run, prune time vs one plain forward pass,
peak GPU memory, and a 1-process NCCL run of the data-parallel path. Run through benchmarks/gpu_check.sh.

Models are built offline from configs in benchmarks/configs/ with seeded random weights (no download):
Gemma 3 270M's own config and a Llama-style ~1.1B config. Calibration: seeded random token ids, each
"language" drawing from its own token range (random weights make real text no more informative).

For every model and method (Wanda, M-Wanda defaults, SparseGPT):

- CPU float32 reference masks (``--device cpu`` runs only that);
- CUDA bfloat16 and float32 runs: seconds, ratio to one plain forward pass over the same calibration
  batches (the floor), peak GPU memory (``torch.cuda.max_memory_allocated``), mask agreement with CPU fp32;
- CUDA bfloat16 again inside a 1-process NCCL group: weights compared bit for bit with the run without one;
- on the demo model (Gemma 3 270M's shapes) in bfloat16: every method and memory option of
  docs/large-models.md (float32 Hessian sums, offloaded statistics), with its peak memory above the model,
  its seconds per decoder layer and optimum_mwanda.memory's prediction; then the pre-run check refusing
  half the predicted peak before any weight changes.

Results are written after every step to OUTPUT/gpu_check.json (and .md at the end), so a run cut short still
leaves what it measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda.distributed import current_context, tensor_checksum

CONFIGS = Path(__file__).parent / "configs"
MODELS = {"gemma3-270m": "gemma3_270m.json", "llama-1.1b": "llama_1b.json"}
LANGUAGES = ("en", "de", "sw", "zh")


def build_model(name: str, tiny: bool) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads((CONFIGS / MODELS[name]).read_text())
    for key in ("_model_name_or_path", "transformers_version", "architectures", "dtype"):
        data.pop(key, None)
    if tiny:  # the same architecture, shrunk for a CPU smoke test
        layers = 3
        data.update(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, vocab_size=512)
        data.update(num_attention_heads=4, num_key_value_heads=1 if "gemma" in name else 2, head_dim=16)
        if "layer_types" in data:
            data["layer_types"] = data["layer_types"][:layers]
    model_type = data.pop("model_type")
    config = AutoConfig.for_model(model_type, **data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def calibration(vocab: int, samples: int, seq_len: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    width = max(16, vocab // (len(LANGUAGES) + 1))
    out = {}
    for i, language in enumerate(LANGUAGES):
        low = 3 + i * width // 2
        out[language] = torch.randint(low, min(vocab, low + width), (samples, seq_len), generator=generator)
    return out


def configs(samples: int, seq_len: int) -> dict[str, object]:
    common = dict(sparsity=0.5, samples_per_language=samples, calibration_seq_len=seq_len, batch_size=4)
    return {
        "wanda": WandaConfig(**common),
        "mwanda": MWandaConfig(**common),
        "sparsegpt": SparseGPTConfig(**common),
    }


def scale_configs(samples: int, seq_len: int) -> dict[str, tuple[object, dict]]:
    """Every method and every memory option of docs/large-models.md: ``name -> (config, prune_model kwargs)``."""
    common = dict(samples_per_language=samples, calibration_seq_len=seq_len, batch_size=4)
    return {
        "wanda-50": (WandaConfig(sparsity=0.5, **common), {}),
        "mwanda-closed-form-50": (MWandaConfig(sparsity=0.5, **common), {}),
        "sparsegpt-50": (SparseGPTConfig(sparsity=0.5, **common), {}),
        "sparsegpt-50-f32": (SparseGPTConfig(sparsity=0.5, **common), {"statistics_dtype": "float32"}),
        "mwanda-sweep-70": (MWandaConfig(sparsity=0.7, **common), {}),
        "mwanda-sweep-70-f32-offload": (
            MWandaConfig(sparsity=0.7, **common),
            {"statistics_dtype": "float32", "offload_statistics": True},
        ),
        "mwanda-sweep-2of4": (MWandaConfig(mask_structure="2:4", **common), {}),
    }


def predicted_extra_bytes(model, config, kwargs: dict, tokens: int, batch_tokens: int) -> int:
    """optimum_mwanda.memory's prediction of the run's peak above the resident model (the model is wholly
    on the device here: its weights are already allocated, the walk's copy of a layer's pruned weights is
    not)."""
    from optimum_mwanda import memory

    dtype = kwargs.get("statistics_dtype", "float64")
    spec = memory.MethodSpec.from_config(
        config.resolve(), languages=len(LANGUAGES), statistics_bytes=4 if dtype == "float32" else 8
    )
    shape = memory.LayerShape.from_config(model.config)
    element = next(model.parameters()).element_size()
    peak = memory.run_peak(
        spec,
        shape,
        tokens,
        batch_tokens,
        element,
        element,
        offload_statistics=kwargs.get("offload_statistics", False),
    )
    return peak.total - shape.params * element


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def masks_of(model: torch.nn.Module, names) -> dict[str, torch.Tensor]:
    return {name: (model.get_submodule(name).weight == 0).cpu() for name in names}


def agreement(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    same = sum(int((a[k] == b[k]).sum()) for k in a)
    return same / sum(a[k].numel() for k in a)


def plain_forward_seconds(model, batches, device) -> float:
    """The floor: one forward pass of the whole model over the calibration batches."""
    with torch.no_grad():
        model(input_ids=batches[0].to(device), use_cache=False)  # warm-up (kernels, allocator)
        sync(device)
        start = time.perf_counter()
        for batch in batches:
            model(input_ids=batch.to(device), use_cache=False)
        sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="shrunk models, for a CPU smoke test")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--samples-per-language", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default=os.environ.get("OUT") or "benchmarks/results/gpu_check")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    if args.tiny:
        args.samples_per_language, args.seq_len = min(args.samples_per_language, 2), min(args.seq_len, 32)

    record: dict = {
        "settings": vars(args),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "models": {},
    }

    def save() -> None:
        record["load_average"] = os.getloadavg()
        (out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str))

    def log(message: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)

    for name in args.models:
        dense = build_model(name, args.tiny)
        state = {k: v.clone() for k, v in dense.state_dict().items()}
        cal = calibration(dense.config.vocab_size, args.samples_per_language, args.seq_len)
        batches = [
            torch.cat(list(cal.values()))[i : i + 4] for i in range(0, len(LANGUAGES) * len(cal["en"]), 4)
        ]
        entry: dict = {"parameters": sum(p.numel() for p in dense.parameters()), "runs": {}}
        record["models"][name] = entry
        log(f"{name}: {entry['parameters'] / 1e6:.0f}M parameters")

        # CPU float32 reference.
        reference: dict[str, dict[str, torch.Tensor]] = {}
        for method, config in configs(args.samples_per_language, args.seq_len).items():
            dense.load_state_dict(state)
            start = time.perf_counter()
            report = Pruner(config).prune_model(dense, cal, show_progress=False)
            reference[method] = masks_of(dense, report.module_sparsity)
            entry["runs"][f"reference-cpufp32-{method}"] = {"seconds": time.perf_counter() - start}
            log(f"{name} cpu fp32 {method}: {time.perf_counter() - start:.1f} s")
            save()

        for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            dense.load_state_dict(state)
            # A copy: converting in place would round non-persistent buffers (rotary frequencies), which
            # load_state_dict does not restore, and change the later runs.
            model = copy.deepcopy(dense).to(device=device, dtype=dtype)
            floor = plain_forward_seconds(model, batches, device)
            entry[f"floor_seconds_{dtype_name}"] = floor
            dense_gpu = {k: v.clone() for k, v in model.state_dict().items()}
            checksums: dict[str, list[int]] = {}
            for method, config in configs(args.samples_per_language, args.seq_len).items():
                model.load_state_dict(dense_gpu)
                cuda = device.type == "cuda"
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device) if cuda else 0
                sync(device)
                start = time.perf_counter()
                report = Pruner(config).prune_model(model, cal, show_progress=False)
                sync(device)
                seconds = time.perf_counter() - start
                masks = masks_of(model, report.module_sparsity)
                checksums[method] = [
                    tensor_checksum(model.get_submodule(n).weight) for n in report.module_sparsity
                ]
                entry["runs"][f"{device.type}-{dtype_name}-{method}"] = {
                    "seconds": seconds,
                    "x_floor": seconds / floor,
                    "timings": report.timings,
                    **(
                        {
                            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                            "model_memory_gib": base / 2**30,
                        }
                        if cuda
                        else {}
                    ),
                    "mask_agreement_with_cpu_fp32": agreement(masks, reference[method]),
                    "achieved_sparsity": report.achieved_sparsity,
                }
                log(f"{name} {dtype_name} {method}: {seconds:.2f} s ({seconds / floor:.1f}x floor)")
                save()

            backend = "nccl" if device.type == "cuda" else "gloo"
            if dtype_name == "bf16":  # the data-parallel path in a 1-process NCCL group (gloo on CPU)
                with tempfile.TemporaryDirectory() as store:
                    torch.distributed.init_process_group(
                        backend,
                        init_method=f"file://{store}/rendezvous",
                        rank=0,
                        world_size=1,
                        **({"device_id": device} if device.type == "cuda" else {}),
                    )
                    try:
                        assert current_context().backend == backend
                        for method, config in configs(args.samples_per_language, args.seq_len).items():
                            model.load_state_dict(dense_gpu)
                            sync(device)
                            start = time.perf_counter()
                            report = Pruner(config).prune_model(model, cal, show_progress=False)
                            sync(device)
                            got = [
                                tensor_checksum(model.get_submodule(n).weight) for n in report.module_sparsity
                            ]
                            entry["runs"][f"group1-bf16-{method}"] = {
                                "seconds": time.perf_counter() - start,
                                "bit_identical_to_plain_run": got == checksums[method],
                            }
                            log(f"{name} nccl bf16 {method}: identical={got == checksums[method]}")
                            save()
                    finally:
                        torch.distributed.destroy_process_group()
            if dtype_name == "bf16" and name == "gemma3-270m":
                scale_runs(model, dense_gpu, cal, args, device, entry, save, log)
            del model, dense_gpu
            if device.type == "cuda":
                torch.cuda.empty_cache()
    record["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save()
    (out / "gpu_check.md").write_text(markdown(record))
    print(markdown(record))


def scale_runs(model, dense_state, cal, args, device, entry, save, log) -> None:
    """Peak memory and seconds per layer of every method and memory option on the demo model's shapes,
    against optimum_mwanda.memory's prediction; then the pre-run check refusing a too-small budget."""
    from optimum_mwanda.memory import InsufficientMemoryError

    cuda = device.type == "cuda"
    layers = model.config.num_hidden_layers
    tokens = sum(v.numel() for v in cal.values())
    results = entry.setdefault("scale", {})
    for run, (config, kwargs) in scale_configs(args.samples_per_language, args.seq_len).items():
        model.load_state_dict(dense_state)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device) if cuda else 0
        sync(device)
        start = time.perf_counter()
        report = Pruner(config).prune_model(model, cal, show_progress=False, **kwargs)
        sync(device)
        seconds = time.perf_counter() - start
        predicted = predicted_extra_bytes(model, config, kwargs, tokens, 4 * args.seq_len)
        results[run] = {
            "seconds": seconds,
            "seconds_per_layer": seconds / layers,
            "timings": report.timings,
            "predicted_extra_gib": predicted / 2**30,
            **({"peak_extra_gib": (torch.cuda.max_memory_allocated(device) - base) / 2**30} if cuda else {}),
        }
        log(f"scale {run}: {seconds / layers:.3f} s per layer, {results[run]}")
        save()
    model.load_state_dict(dense_state)
    config, _ = scale_configs(args.samples_per_language, args.seq_len)["sparsegpt-50"]
    budget = max(1, predicted_extra_bytes(model, config, {}, tokens, 4 * args.seq_len) // 2)
    try:
        Pruner(config).prune_model(model, cal, show_progress=False, memory_budget=budget)
        refused = "not refused"
    except InsufficientMemoryError as error:
        refused = str(error)
    unchanged = all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items())
    results["pre_run_check"] = {"message": refused, "weights_unchanged": unchanged}
    log(f"pre-run check with half the predicted peak as budget: {refused} (weights unchanged: {unchanged})")
    save()


def markdown(record: dict) -> str:
    lines = [
        "# GPU check",
        "",
        f"{record['gpu'] or 'CPU only'}; torch {record['torch']} (CUDA {record['cuda']}); started "
        f"{record['started']}, finished {record.get('finished')}; load average {record.get('load_average')}",
        f"Settings: {json.dumps(record['settings'])}",
        "",
        "| model | run | seconds | x floor | peak GPU GiB | masks = CPU fp32 | 1-process group identical |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, entry in record["models"].items():
        for run, values in entry["runs"].items():
            if run.startswith("group1"):
                continue
            cells = [name, run, f"{values['seconds']:.2f}"]
            cells.append(f"{values['x_floor']:.1f}" if "x_floor" in values else "")
            cells.append(f"{values['peak_memory_gib']:.2f}" if "peak_memory_gib" in values else "")
            agree = values.get("mask_agreement_with_cpu_fp32")
            cells.append(f"{100 * agree:.3f}%" if agree is not None else "")
            parts = run.split("-", 2)
            nccl = entry["runs"].get(f"group1-bf16-{parts[2]}", {}) if parts[1] == "bf16" else {}
            cells.append(str(nccl.get("bit_identical_to_plain_run", "")))
            lines.append("| " + " | ".join(cells) + " |")
    for name, entry in record["models"].items():
        scale = entry.get("scale")
        if not scale:
            continue
        lines += [
            "",
            f"## {name}, bf16: every method and memory option (docs/large-models.md)",
            "",
            "| run | seconds per layer | peak above the model GiB | predicted GiB |",
            "|---|---:|---:|---:|",
        ]
        for run, values in scale.items():
            if run == "pre_run_check":
                continue
            peak = values.get("peak_extra_gib")
            lines.append(
                f"| {run} | {values['seconds_per_layer']:.3f} | {'' if peak is None else f'{peak:.3f}'} | "
                f"{values['predicted_extra_gib']:.3f} |"
            )
        check = scale.get("pre_run_check", {})
        lines.append(
            f"\nPre-run check, half the predicted peak as budget: {check.get('message')} (weights unchanged: "
            f"{check.get('weights_unchanged')})"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
