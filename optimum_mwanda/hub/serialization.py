"""Save and reload pruned models: standard transformers checkpoints with sparsity metadata, or the compressed
bitmask format, always written atomically.

A saved folder holds what ``model.save_pretrained`` writes (``config.json`` with a ``sparsity_config`` entry,
``generation_config.json``, safetensors weights), the tokenizer files when a tokenizer is given,
``pruning_report.json``, and by default a model card (``README.md``) with its per-layer sparsity plot.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from ..distributed import main_process_only
from ..report import PruningReport
from ..version import __version__
from .atomic import atomic_directory, check_replaceable
from .card import PLOT_FILENAME, _check_eval_results, achieved_layer_sparsity, create_model_card
from .compression import (
    DENSE_INDEX_NAME,
    FORMAT_NAME,
    SPARSE_INDEX_NAME,
    SPARSE_SUFFIX,
    compress_shard,
    decompress_shard,
    sparse_name_for,
)
from .languages import resolve_languages

SPARSITY_CONFIG_KEY = "sparsity_config"
REPORT_FILENAME = "pruning_report.json"
CARD_FILENAME = "README.md"
DENSE_FORMAT = "dense"
#: keyword arguments of ``from_pretrained`` that only matter for fetching from the Hub
_HUB_KWARGS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies")


def build_sparsity_config(report: PruningReport, checkpoint_format: str = DENSE_FORMAT) -> dict[str, Any]:
    """The ``sparsity_config`` entry written into ``config.json`` (a JSON-ready summary of the report)."""
    achieved_layers = achieved_layer_sparsity(report)
    return {
        "method": report.method,
        "target_sparsity": report.target_sparsity,
        "achieved_sparsity": round(report.achieved_sparsity, 6),
        "mask_structure": report.config.get("mask_structure", "unstructured"),
        "layerwise": report.config.get("layerwise", "uniform"),
        "layer_sparsity": [round(s, 6) for s in report.layer_sparsity],
        "achieved_layer_sparsity": [
            round(achieved_layers.get(i, 0.0), 6) for i in range(len(achieved_layers))
        ],
        "ignore": list(report.config.get("ignore", [])),
        "calibration_languages": list(report.languages),
        "calibration_token_counts": dict(report.token_counts),
        "calibration_sources": dict(report.calibration_sources),
        "optimum_mwanda_version": __version__,
        "checkpoint_format": checkpoint_format,
    }


def _has_offloaded_weights(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _validate_save_inputs(model, report, compressed, eval_results, save_kwargs, write_card) -> None:
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(report, PruningReport):
        raise TypeError(f"report must be a PruningReport, got {type(report).__name__}")
    if not isinstance(compressed, bool):
        raise TypeError(f"compressed must be True or False, got {compressed!r}")
    if save_kwargs.get("safe_serialization") is False:
        raise ValueError("pruned models are saved as safetensors only; drop safe_serialization=False")
    evals = _check_eval_results(eval_results)
    if write_card:
        # Fail on a bad language code now, before any file is written.
        resolve_languages(
            list(dict.fromkeys([*report.languages, *evals.get("before", {}), *evals.get("after", {})]))
        )


def _compress_folder(folder: Path) -> list[str]:
    """Replace every dense safetensors shard in ``folder`` by its bitmask form; return the new file names."""
    dense_files = sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(SPARSE_SUFFIX))
    if not dense_files:
        raise RuntimeError(f"save_pretrained wrote no safetensors weights into {folder}")
    written = []
    for dense in dense_files:
        sparse = folder / sparse_name_for(dense.name)
        compress_shard(dense, sparse)
        dense.unlink()
        written.append(sparse.name)
    index = folder / DENSE_INDEX_NAME
    if index.exists():
        # Under its own name the index would send transformers looking for shards that are not there.
        index.rename(folder / SPARSE_INDEX_NAME)
    return written


def _rewrite_sparsity_config(config_path: Path, **updates: Any) -> None:
    data = json.loads(config_path.read_text(encoding="utf-8"))
    entry = dict(data.get(SPARSITY_CONFIG_KEY) or {})
    entry.update(updates)
    for key, value in list(entry.items()):
        if value is None:
            del entry[key]
    data[SPARSITY_CONFIG_KEY] = entry
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@main_process_only  # data-parallel runs: rank 0 writes, the others wait for it
def save_pruned_model(
    model,
    save_directory: str | os.PathLike,
    report: PruningReport,
    tokenizer=None,
    compressed: bool = False,
    eval_results: dict[str, dict[str, float]] | None = None,
    *,
    model_card: bool = True,
    base_model: str | None = None,
    model_id: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    eval_dataset: str | None = None,
    **save_kwargs: Any,
) -> Path:
    """Save a pruned model (and tokenizer, report, model card) into ``save_directory``, atomically.

    Everything is written into a hidden sibling folder which then replaces ``save_directory`` by renames: an
    interrupted save leaves ``save_directory`` as it was (missing, or the previous checkpoint, intact). An
    existing ``save_directory`` must be empty or a previous checkpoint, because it is replaced as a whole.

    Args:
        model: the pruned transformers model (device-mapped and Accelerate-offloaded models are fine: their
            offloaded weights are read back and written out).
        save_directory: destination folder.
        report: the run's :class:`PruningReport` (summarised as ``sparsity_config`` in ``config.json`` and
            written in full to ``pruning_report.json``).
        tokenizer: saved beside the model when given.
        compressed: write the bitmask format (``*.sparse.safetensors``), which plain transformers cannot
            load; restore it with :func:`load_pruned_model`.
        eval_results: ``{"before": {lang: ppl}, "after": {lang: ppl}}`` for the model card.
        model_card: write ``README.md`` and the per-layer sparsity plot.
        base_model, model_id, license, datasets, eval_dataset: passed to :func:`create_model_card`.
            ``base_model`` defaults to the report's ``base_model`` when that is a Hub id (not a local folder).
        **save_kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Returns:
        The absolute path of the saved folder. ``model.config.sparsity_config`` is set as a side effect, so
        the in-memory model describes itself like the saved one.
    """
    _validate_save_inputs(model, report, compressed, eval_results, save_kwargs, model_card)
    target = check_replaceable(save_directory)
    source = getattr(model, "name_or_path", "") or ""
    if _has_offloaded_weights(model) and source and Path(source).absolute() == target:
        # Offloaded weights are read lazily from the checkpoint they were loaded from; replacing that folder
        # would pull the files out from under the model.
        raise ValueError(
            f"{str(target)!r} is the checkpoint this offloaded model reads its weights from; save elsewhere"
        )

    model.config.sparsity_config = build_sparsity_config(report)
    with atomic_directory(target) as staging:
        model.save_pretrained(staging, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / REPORT_FILENAME).write_text(report.to_json(), encoding="utf-8")
        if compressed:
            files = _compress_folder(staging)
            _rewrite_sparsity_config(
                staging / "config.json", checkpoint_format=FORMAT_NAME, sparse_files=files
            )
        if model_card:
            card = create_model_card(
                report,
                base_model=base_model,
                eval_results=eval_results,
                model_id=model_id,
                license=license,
                datasets=datasets,
                plot_path=staging / PLOT_FILENAME,
                compressed=compressed,
                eval_dataset=eval_dataset,
            )
            card.save(staging / CARD_FILENAME)
    return target


def _as_hub_id(reference: str) -> str | None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(reference)
    except HFValidationError:
        return None
    return reference


def _read_config(path_or_repo: str, hub_kwargs: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """``config.json`` of a local folder or a Hub repo, and the local folder (``None`` for a repo)."""
    local = Path(path_or_repo)
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(local)!r} has no config.json: it is not a saved model")
        return json.loads(config_path.read_text(encoding="utf-8")), local
    if _as_hub_id(path_or_repo) is None:
        raise ValueError(f"{path_or_repo!r} is neither a local folder nor a valid Hub repo id")
    from huggingface_hub import hf_hub_download

    config_path = hf_hub_download(path_or_repo, "config.json", **hub_kwargs)
    return json.loads(Path(config_path).read_text(encoding="utf-8")), None


def _restore_dense(folder: Path, sparse_files: list[str]) -> Path:
    """A temporary folder with ``folder``'s JSON files and dense shards rebuilt from its sparse files."""
    restored = Path(tempfile.mkdtemp(prefix="optimum-mwanda-restore-"))
    try:
        for item in folder.glob("*.json"):
            if item.name == SPARSE_INDEX_NAME:
                shutil.copyfile(item, restored / DENSE_INDEX_NAME)
            elif item.name != REPORT_FILENAME:
                shutil.copyfile(item, restored / item.name)
        for name in sparse_files:
            sparse = folder / Path(name).name
            if not sparse.is_file():
                raise FileNotFoundError(f"the compressed checkpoint {str(folder)!r} lacks {name}")
            decompress_shard(sparse, restored)
        # In memory the model is dense again; a later plain save_pretrained must not claim otherwise.
        _rewrite_sparsity_config(restored / "config.json", checkpoint_format=DENSE_FORMAT, sparse_files=None)
    except BaseException:
        shutil.rmtree(restored, ignore_errors=True)
        raise
    return restored


def load_pruned_model(path_or_repo: str | os.PathLike, **from_pretrained_kwargs: Any):
    """Load a model saved by :func:`save_pruned_model`, dense or compressed, from a folder or a Hub repo.

    Dense checkpoints go straight to ``AutoModelForCausalLM.from_pretrained``. Compressed ones are first
    rebuilt as a dense checkpoint in a temporary folder, which lives as long as the returned model (an
    offloaded model keeps reading from it) and is deleted when the model is garbage-collected or at exit.

    Args:
        path_or_repo: a local folder or a Hub repo id.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``device_map``, ``dtype``, ``revision``,
            ``token``...).
    """
    from transformers import AutoModelForCausalLM

    path_or_repo = os.fspath(path_or_repo)
    hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
    config, local = _read_config(path_or_repo, hub_kwargs)
    entry = config.get(SPARSITY_CONFIG_KEY) or {}
    checkpoint_format = entry.get("checkpoint_format", DENSE_FORMAT)
    if checkpoint_format == DENSE_FORMAT:
        return AutoModelForCausalLM.from_pretrained(path_or_repo, **from_pretrained_kwargs)
    if checkpoint_format != FORMAT_NAME:
        raise ValueError(
            f"{path_or_repo!r} uses checkpoint format {checkpoint_format!r}, unknown to optimum-mwanda "
            f"{__version__}; upgrade optimum-mwanda"
        )
    sparse_files = list(entry.get("sparse_files") or [])
    if not sparse_files:
        raise ValueError(
            f"{path_or_repo!r} is marked compressed but its sparsity_config lists no sparse files"
        )
    if local is None:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path_or_repo, allow_patterns=["*.json", *sparse_files], **hub_kwargs))
    restored = _restore_dense(local, sparse_files)
    load_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k not in _HUB_KWARGS}
    try:
        model = AutoModelForCausalLM.from_pretrained(restored, **load_kwargs)
    except BaseException:
        shutil.rmtree(restored, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, str(restored), True)
    model.name_or_path = path_or_repo
    model.config._name_or_path = path_or_repo
    return model
