"""Save and reload pruned models: standard transformers checkpoints with sparsity metadata, or the compressed
bitmask format, written as one crash-consistent transaction (see :mod:`.atomic`).

A saved folder holds what ``model.save_pretrained`` writes (``config.json`` with a ``sparsity_config`` entry,
``generation_config.json``, safetensors weights), the tokenizer files when a tokenizer is given,
``pruning_report.json``, ``eval_results.json`` when evaluation results are given, by default a model card
(``README.md``) with its per-layer sparsity plot, and the manifest of these files. Anything else in the folder
is the user's and is kept.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

from ..calibration.languages import resolve_languages
from ..distributed import main_process_only
from ..modeling.offload import offload_source_folders
from ..report import PruningReport
from ..version import __version__
from .atomic import MANIFEST_NAME, check_replaceable, file_sha256, save_transaction, write_file
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
from .identity import as_hub_id

logger = logging.getLogger(__name__)

SPARSITY_CONFIG_KEY = "sparsity_config"
REPORT_FILENAME = "pruning_report.json"
CARD_FILENAME = "README.md"
#: ``{"before": {language: perplexity}, "after": {...}}``, written whenever evaluation results are given, so
#: that ``optimum-mwanda card`` rebuilds the card with the same numbers
EVAL_RESULTS_FILENAME = "eval_results.json"
#: ``sparsity_config`` key with the SHA-256 of every compressed file, checked before a compressed load
SPARSE_DIGESTS_KEY = "sparse_files_sha256"
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
        "mask_structure": report.config.mask_structure,
        "layerwise": report.config.layerwise,
        "layer_sparsity": [round(s, 6) for s in report.layer_sparsity],
        "achieved_layer_sparsity": [
            round(achieved_layers.get(i, 0.0), 6) for i in range(len(achieved_layers))
        ],
        "ignore": list(report.config.ignore),
        "calibration_languages": list(report.languages),
        "calibration_token_counts": dict(report.token_counts),
        "calibration_sources": dict(report.calibration_sources),
        "optimum_mwanda_version": __version__,
        "checkpoint_format": checkpoint_format,
    }


def _check_not_reading_from(model, target: Path) -> None:
    """Refuse to save into a folder the model still reads weights from lazily (its disk-offload folder or the
    checkpoint Accelerate maps): the save swaps those files out from under it."""
    folders = offload_source_folders(model)
    source = getattr(model, "name_or_path", "") or ""
    if source and os.path.isdir(source) and any(p.device.type == "meta" for p in model.parameters()):
        folders.add(os.path.abspath(source))
    for folder in folders:
        resolved = Path(os.path.realpath(folder))
        if resolved == target or resolved.is_relative_to(target):
            raise ValueError(
                f"{str(target)!r} holds files this offloaded model still reads its weights from ({folder}); "
                "save elsewhere"
            )


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
        os.replace(index, folder / SPARSE_INDEX_NAME)
    return written


def _rewrite_sparsity_config(config_path: Path, **updates: Any) -> None:
    data = json.loads(config_path.read_text(encoding="utf-8"))
    entry = dict(data.get(SPARSITY_CONFIG_KEY) or {})
    entry.update(updates)
    for key, value in list(entry.items()):
        if value is None:
            del entry[key]
    data[SPARSITY_CONFIG_KEY] = entry
    write_file(config_path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable=False)


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
    overwrite: bool = False,
    durable: bool = True,
    **save_kwargs: Any,
) -> Path:
    """Save a pruned model (and tokenizer, report, evaluation results, model card) into ``save_directory``.

    The save is one crash-consistent transaction (:mod:`optimum_mwanda.hub.atomic`): the new files are
    written beside the folder and swapped in atomically, so ``save_directory`` always holds either the
    previous complete checkpoint or the new one, never a mix and never nothing, whatever instant the process
    dies at. Only files this package wrote are replaced (and its stale shards removed); everything else in the
    folder (``src/``, ``eval/``, notes) is kept. Leftovers of an interrupted save are cleaned up by the next.

    Args:
        model: the pruned transformers model (device-mapped and Accelerate-offloaded models are fine: their
            offloaded weights are read back and written out).
        save_directory: destination folder: new, empty, or holding a model checkpoint.
        report: the run's :class:`PruningReport` (summarised as ``sparsity_config`` in ``config.json`` and
            written in full to ``pruning_report.json``).
        tokenizer: saved beside the model when given.
        compressed: write the bitmask format (``*.sparse.safetensors``, with SHA-256 checksums checked at
            load), which plain transformers cannot load; restore it with :func:`load_pruned_model`.
        eval_results: ``{"before": {lang: ppl}, "after": {lang: ppl}}`` for the model card, also written to
            ``eval_results.json``.
        model_card: write ``README.md`` and the per-layer sparsity plot.
        base_model, model_id, license, datasets, eval_dataset: passed to :func:`create_model_card`.
            ``base_model`` defaults to the report's ``base_model`` when that is a Hub id (not a local folder).
        overwrite: also write into a folder that holds files but no model checkpoint, and replace files with
            the checkpoint's names (``README.md``, ``config.json``...) that this package did not write. Other
            files are kept even then.
        durable: fsync every new file and folder before the atomic swap (and the parent folder after it), so
            that a power loss or kernel crash right after the save returns still finds the new folder
            complete. ``False`` saves that time; the folder is then old-or-new under process crashes only.
        **save_kwargs: passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

    Raises:
        CheckpointConflictError: (a ``ValueError``) the folder is not a checkpoint, or holds a file of the
            user's where the save would write, and ``overwrite`` is not set.
        FolderInUseError: (a ``RuntimeError``) another save or pruning run holds the folder's lock.
        ValueError: the folder holds weights the (offloaded) model still reads, or an input is invalid.

    Returns:
        The absolute path of the saved folder. ``model.config.sparsity_config`` is set as a side effect, so
        the in-memory model describes itself like the saved one.
    """
    _validate_save_inputs(model, report, compressed, eval_results, save_kwargs, model_card)
    for name, flag in (("overwrite", overwrite), ("durable", durable)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    evals = _check_eval_results(eval_results)
    fixed_names = [REPORT_FILENAME, *([EVAL_RESULTS_FILENAME] if evals else [])]
    fixed_names += [CARD_FILENAME, PLOT_FILENAME] if model_card else []
    # Every refusal before any weight is written.
    target = check_replaceable(save_directory, overwrite, writes=fixed_names)
    _check_not_reading_from(model, target)

    model.config.sparsity_config = build_sparsity_config(report)
    with save_transaction(target, overwrite=overwrite, durable=durable) as staging:
        model.save_pretrained(staging, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_file(staging / REPORT_FILENAME, report.to_json(), durable=False)
        if evals:
            write_file(
                staging / EVAL_RESULTS_FILENAME,
                json.dumps(evals, indent=2, sort_keys=True) + "\n",
                durable=False,
            )
        if compressed:
            files = _compress_folder(staging)
            digests = {name: file_sha256(staging / name) for name in files}
            _rewrite_sparsity_config(
                staging / "config.json",
                checkpoint_format=FORMAT_NAME,
                sparse_files=files,
                **{SPARSE_DIGESTS_KEY: digests},
            )
        if model_card:
            card_kwargs = {
                "base_model": base_model,
                "model_id": model_id,
                "license": license,
                "datasets": datasets,
            }
            _write_card(staging, report, evals, compressed, eval_dataset, **card_kwargs)
    return target


def _write_card(staging: Path, report, evals, compressed: bool, eval_dataset, **card_kwargs: Any) -> None:
    """``README.md`` and its plot, into the staging folder of a transaction."""
    card = create_model_card(
        report,
        eval_results=evals or None,
        plot_path=staging / PLOT_FILENAME,
        compressed=compressed,
        eval_dataset=eval_dataset,
        **card_kwargs,
    )
    write_file(staging / CARD_FILENAME, str(card), durable=False)


def load_eval_results(folder: str | os.PathLike) -> dict[str, dict[str, float]] | None:
    """The evaluation results kept with a checkpoint: ``eval_results.json``, else the ``model-index``
    perplexities of its model card (the "after" values only; a warning says the "before" ones are lost).
    ``None`` when neither holds any."""
    folder = Path(folder)
    saved = folder / EVAL_RESULTS_FILENAME
    if saved.is_file():
        return _check_eval_results(json.loads(saved.read_text(encoding="utf-8")))
    card = folder / CARD_FILENAME
    if not card.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        results = ModelCard.load(card, ignore_metadata_errors=True).data.eval_results or []
    except Exception:  # an unreadable card holds nothing to keep
        return None
    after = {
        str(r.dataset_config): float(r.metric_value)
        for r in results
        if r.metric_type == "perplexity" and r.dataset_config
    }
    if not after:
        return None
    logger.warning(
        "%s has no %s: reusing the card's model-index perplexities (after pruning only; the 'before' column "
        "cannot be recovered)",
        folder,
        EVAL_RESULTS_FILENAME,
    )
    return _check_eval_results({"after": after})


@main_process_only  # data-parallel runs: rank 0 writes, the others wait for it
def rewrite_model_card(
    folder: str | os.PathLike,
    *,
    eval_results: dict[str, dict[str, float]] | None = None,
    base_model: str | None = None,
    model_id: str | None = None,
    license: str | None = None,
    eval_dataset: str | None = None,
) -> dict[str, Any]:
    """Rebuild ``README.md`` and the sparsity plot of a saved checkpoint from its report and config.

    Nothing is dropped silently: evaluation results not given are those kept with the checkpoint
    (:func:`load_eval_results`); base model, licence and model id not given are those of the existing card.
    New ``eval_results`` are also written to ``eval_results.json``. The same crash-consistent transaction as a
    save replaces the card files only; weights and the user's files stay as they are.

    Returns:
        What the card was built from: ``card``, ``plot``, ``base_model``, ``license``, ``model_id``,
        ``eval_results``, ``compressed``.
    """
    folder = Path(folder).expanduser().absolute()
    missing = [name for name in (REPORT_FILENAME, "config.json") if not (folder / name).is_file()]
    if not folder.is_dir() or missing:
        raise FileNotFoundError(
            f"{str(folder)!r} lacks {' and '.join(missing) or 'everything'}: give a folder saved by "
            "`optimum-mwanda prune` or Pruner.save_pretrained"
        )
    report = PruningReport.from_dict(_read_json(folder / REPORT_FILENAME))
    entry = _read_json(folder / "config.json").get(SPARSITY_CONFIG_KEY) or {}
    compressed = entry.get("checkpoint_format") == FORMAT_NAME
    given = eval_results is not None
    evals = _check_eval_results(eval_results) if given else (load_eval_results(folder) or {})
    previous = _previous_card_data(folder / CARD_FILENAME)
    base_model = base_model if base_model is not None else previous.get("base_model")
    license = license if license is not None else previous.get("license")
    if model_id is None and "/" in str(previous.get("model_name") or ""):
        model_id = previous["model_name"]  # the card of a pushed model is named after its repo
    writes = [CARD_FILENAME, PLOT_FILENAME, *([EVAL_RESULTS_FILENAME] if given else [])]
    check_replaceable(folder, writes=writes)
    with save_transaction(folder, keep_own=True) as staging:
        card_kwargs = {"base_model": base_model, "model_id": model_id, "license": license}
        _write_card(staging, report, evals, compressed, eval_dataset, **card_kwargs)
        if given:
            write_file(
                staging / EVAL_RESULTS_FILENAME,
                json.dumps(evals, indent=2, sort_keys=True) + "\n",
                durable=False,
            )
    return {
        "card": folder / CARD_FILENAME,
        "plot": folder / PLOT_FILENAME,
        "base_model": base_model,
        "license": license,
        "model_id": model_id,
        "eval_results": evals or None,
        "compressed": compressed,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _previous_card_data(path: Path) -> dict[str, Any]:
    """Metadata of an existing card (base model, licence, name), kept when the card is rebuilt."""
    if not path.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data
    except Exception:  # an unreadable old card is simply replaced
        return {}
    return {key: getattr(data, key, None) for key in ("base_model", "license", "model_name")}


def _read_config(path_or_repo: str, hub_kwargs: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """``config.json`` of a local folder or a Hub repo, and the local folder (``None`` for a repo)."""
    local = Path(path_or_repo)
    if local.is_dir():
        config_path = local / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{str(local)!r} has no config.json: it is not a saved model")
        return json.loads(config_path.read_text(encoding="utf-8")), local
    if as_hub_id(path_or_repo) is None:
        raise ValueError(f"{path_or_repo!r} is neither a local folder nor a valid Hub repo id")
    from huggingface_hub import hf_hub_download

    config_path = hf_hub_download(path_or_repo, "config.json", **hub_kwargs)
    return json.loads(Path(config_path).read_text(encoding="utf-8")), None


def _verify_digest(sparse: Path, expected: str | None) -> None:
    if not isinstance(expected, str):
        # Every compressed save records one per file: a missing record is a changed config, not an old one.
        raise ValueError(
            f"{sparse} has no SHA-256 in config.json's sparsity_config.{SPARSE_DIGESTS_KEY}: the checkpoint's "
            "integrity record was removed or altered; restore config.json from its source or save the model again"
        )
    actual = file_sha256(sparse)
    if actual != expected:
        raise ValueError(
            f"{sparse} is corrupt: its SHA-256 is {actual[:16]}..., config.json records {str(expected)[:16]}... "
            "(damaged on disk or in transfer); restore the file from its source or save the model again"
        )


def _restore_dense(folder: Path, sparse_files: list[str], digests: dict[str, str]) -> Path:
    """A temporary folder with ``folder``'s JSON files and dense shards rebuilt from its sparse files."""
    restored = Path(tempfile.mkdtemp(prefix="optimum-mwanda-restore-"))
    skip = {REPORT_FILENAME, EVAL_RESULTS_FILENAME, MANIFEST_NAME}
    try:
        for item in folder.glob("*.json"):
            if item.name == SPARSE_INDEX_NAME:
                shutil.copyfile(item, restored / DENSE_INDEX_NAME)
            elif item.name not in skip:
                shutil.copyfile(item, restored / item.name)
        for name in sparse_files:
            sparse = folder / Path(name).name
            if not sparse.is_file():
                raise FileNotFoundError(f"the compressed checkpoint {str(folder)!r} lacks {name}")
            _verify_digest(sparse, digests.get(Path(name).name))
            try:
                decompress_shard(sparse, restored)
            except Exception as err:  # safetensors' own error type too: any unreadable file is corrupt
                raise ValueError(f"{sparse} is not a readable {FORMAT_NAME} file: {err}") from err
        # In memory the model is dense again; a later plain save_pretrained must not claim otherwise.
        _rewrite_sparsity_config(
            restored / "config.json",
            checkpoint_format=DENSE_FORMAT,
            sparse_files=None,
            **{SPARSE_DIGESTS_KEY: None},
        )
    except BaseException:
        shutil.rmtree(restored, ignore_errors=True)
        raise
    return restored


def load_pruned_model(path_or_repo: str | os.PathLike, **from_pretrained_kwargs: Any):
    """Load a model saved by :func:`save_pruned_model`, dense or compressed, from a folder or a Hub repo.

    Dense checkpoints go straight to ``AutoModelForCausalLM.from_pretrained``. Compressed ones are first
    checked against the SHA-256 that ``config.json`` records for every sparse file (a missing record is an
    error too) and rebuilt as a dense checkpoint in a temporary folder, which lives as long as the returned
    model (an offloaded model keeps reading from it) and is deleted when the model is garbage-collected or at
    exit. Either way the folder's tensors must cover the model exactly: a weight missing from the files (it
    would be randomly initialised) or a tensor the model does not have is a ``ValueError``.

    Args:
        path_or_repo: a local folder or a Hub repo id.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``device_map``, ``dtype``, ``revision``,
            ``token``...).
    """

    path_or_repo = os.fspath(path_or_repo)
    hub_kwargs = {k: from_pretrained_kwargs[k] for k in _HUB_KWARGS if k in from_pretrained_kwargs}
    config, local = _read_config(path_or_repo, hub_kwargs)
    entry = config.get(SPARSITY_CONFIG_KEY) or {}
    checkpoint_format = entry.get("checkpoint_format", DENSE_FORMAT)
    if checkpoint_format == DENSE_FORMAT:
        return _load_covered(path_or_repo, path_or_repo, from_pretrained_kwargs)
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
    digests = entry.get(SPARSE_DIGESTS_KEY) or {}
    if not isinstance(digests, dict):
        raise ValueError(f"{path_or_repo!r}: sparsity_config.{SPARSE_DIGESTS_KEY} is malformed")
    restored = _restore_dense(local, sparse_files, digests)
    load_kwargs = {k: v for k, v in from_pretrained_kwargs.items() if k not in _HUB_KWARGS}
    try:
        loaded = _load_covered(restored, path_or_repo, load_kwargs)
    except BaseException:
        shutil.rmtree(restored, ignore_errors=True)
        raise
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    weakref.finalize(model, shutil.rmtree, str(restored), True)
    model.name_or_path = path_or_repo
    model.config._name_or_path = path_or_repo
    return loaded


def _load_covered(source: str | os.PathLike, name: str, kwargs: dict[str, Any]):
    """``from_pretrained(source)``, refused unless the files' tensors are exactly the model's."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(kwargs)
    wants_info = bool(kwargs.pop("output_loading_info", False))
    model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    problems = {
        "missing from the files (they would be randomly initialised)": info.get("missing_keys"),
        "not in the model": info.get("unexpected_keys"),
        "of the wrong shape": [
            str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or []
        ],
    }
    found = [
        f"{len(keys)} tensor(s) {what} ({', '.join(sorted(keys)[:3])}{' ...' if len(keys) > 3 else ''})"
        for what, keys in problems.items()
        if keys
    ]
    if found:
        raise ValueError(
            f"{name!r} does not hold exactly this model's weights: {'; '.join(found)}. The checkpoint is "
            "incomplete or altered: restore it from its source or save the model again"
        )
    return (model, info) if wants_info else model
