"""The resume checkpoint: a pruning run's progress persisted after every decoder layer, crash-consistently.

(The *resume checkpoint* is the ``checkpoint_dir`` folder of a run in progress, not the saved model.) It
plugs into the sequential walk as its :class:`~optimum_mwanda.modeling.walk.ProgressListener`: the walk
tells it about every finished layer and asks it, at the start, what an earlier run finished. A resume
checkpoint folder holds only files with these names (nothing else is ever written, replaced or deleted):

- ``state.json``: the run's fingerprint (config, calibration tokens, model layout *and weights*), the number
  of decoder layers finished, the layer schedule, the per-module results so far, and the name, size and
  sha256 of every data file it relies on; it carries a sha256 of its own content as well;
- ``layer_<i>.safetensors``: the pruned weights of decoder layer ``i``;
- ``hidden_<g>.safetensors``: the hidden states entering the next unfinished layer (one tensor per batch),
  ``g`` the generation of the state that points at it;
- ``.tmp-<one of the names above>``: a file being written.

Crash consistency: every file is written with the package's one atomic writer
(:func:`optimum_mwanda.files.write_file`, durable): under its ``.tmp-`` name, fsynced, renamed into
place and its folder fsynced, so what ``state.json`` says also survives a power loss. A data file is never replaced while the durable ``state.json`` points at it (the hidden states of
each generation get a new name), ``state.json`` is written last and is the only file that says what is
valid, and the files of the previous generation are deleted only once the new ``state.json`` is durable.
So a run killed at any instant leaves either the previous or the next state, complete; files that no state
points at (a half-written ``.tmp-*``, a layer pruned after the last state) are ignored, overwritten by the
resumed run, or deleted once a newer state is durable. Checksums are verified when a checkpoint is loaded,
so a damaged file is a :class:`CheckpointCorruptError`, never a silently different model; and the whole
state is checked against the model (layer count, module names and shapes) before any file is deleted.

One run at a time: while a run uses the folder it holds the folder's lock (a hidden sibling
``.<name>.lock``, see :func:`optimum_mwanda.files.folder_lock`); a second run gets a
:class:`~optimum_mwanda.files.FolderInUseError`, and the lock of a killed run is taken over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .distributed import run_on_main_process
from .files import file_sha256, folder_lock, fsync_directory, write_file
from .modeling import WalkProgress, read_parameter

STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 2
_LAYER_NAME = re.compile(r"layer_(\d+)\.safetensors")
_HIDDEN_NAME = re.compile(r"hidden_(\d+)\.safetensors")
_HASH_CHUNK = 16 * 2**20


class CheckpointError(ValueError):
    """A resume checkpoint (``checkpoint_dir``) that cannot be resumed; the model is left untouched."""


class CheckpointMismatchError(CheckpointError):
    """The resume checkpoint belongs to a run with other arguments (or another model)."""


class CheckpointCorruptError(CheckpointError):
    """A resume checkpoint file is damaged, missing or not what ``state.json`` recorded."""


def _io_event(operation: str, path: Path) -> None:
    """Called right before every file-system step of a checkpoint (``mkdir``, ``open``, ``write`` (between
    the two halves of a file's bytes), ``fsync``, ``rename``, ``fsync-dir``, ``unlink``).

    Does nothing: it is the seam the fault-injection tests replace to raise or SIGKILL at each step.
    """


# -- fingerprint ----------------------------------------------------------------------------------------
def model_weights_digest(model: nn.Module) -> str:
    """sha256 of the name, shape, dtype and bytes of every parameter of ``model``, as it is now.

    Offloaded (meta/disk) parameters are read through :func:`optimum_mwanda.modeling.read_parameter`, so a
    dispatched model digests like the same model in memory. A full hash rather than a sample: on Gemma 3
    270M (268M float32 parameters, 1.07 GB) it takes 1.4-1.5 s on a shared 2-core CPU, 0.3% of one decoder
    forward pass over the calibration tokens (benchmarks/resume_cost.py); a strided sample of 64k values
    per tensor took 0.7 s (touching the pages dominates), so a full hash, which also catches models that
    differ in a few weights only, costs little more.
    """
    digest = hashlib.sha256()
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights count once, under their first name
                continue
            seen.add(id(param))
            value = read_parameter(module, name).detach().to("cpu").contiguous()
            digest.update(f"{module_name}.{name}|{tuple(value.shape)}|{value.dtype}|".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def run_fingerprint(config: dict[str, Any], tensors: list[torch.Tensor], extra: dict[str, Any]) -> str:
    """A hash of everything that decides the masks: config, calibration tensors, model layout and weights
    (pass :func:`model_weights_digest` in ``extra``)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(str((tuple(data.shape), str(data.dtype))).encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# -- state --------------------------------------------------------------------------------------------
#: the progress fields ``state.json`` keeps (under ``"state"``, with ``fingerprint`` and ``hidden_for_layer``)
_PROGRESS_FIELDS = (
    "completed_layers",
    "layer_sparsity",
    "layerwise_signal",
    "module_sparsity",
    "module_shapes",
    "experts",
    "magnitude_pruned",
)
_LATER_FIELDS = ("experts", "magnitude_pruned")
#: expected tensors of each decoder layer: ``{module name: [out_features, in_features]}``
Layout = Sequence[Mapping[str, Sequence[int]]]


@dataclass(frozen=True)
class _FileRecord:
    name: str
    size: int
    sha256: str


def _layer_file(index: int) -> str:
    return f"layer_{index}.safetensors"


def _is_own_name(name: str) -> bool:
    """Whether ``name`` is one this module writes (only such files are ever replaced or deleted)."""
    base = name[len(TMP_PREFIX) :] if name.startswith(TMP_PREFIX) else name
    return base == STATE_FILE or bool(_LAYER_NAME.fullmatch(base) or _HIDDEN_NAME.fullmatch(base))


# state.json carries the sha256 of its own bytes (computed with this placeholder in its place), first key, so
# that any changed byte is detected: a check of the parsed values would miss e.g. 0.49999999999999994 ->
# ...95, which parses to the same float but is still a file someone changed.
_CHECKSUM_PLACEHOLDER = b"0" * 64
_CHECKSUM_FIELD = re.compile(rb'\{\s*"sha256": "([0-9a-f]{64})"')


def _state_bytes(document: dict[str, Any]) -> bytes:
    data = json.dumps({"sha256": _CHECKSUM_PLACEHOLDER.decode(), **document}, indent=1).encode()
    return data.replace(_CHECKSUM_PLACEHOLDER, hashlib.sha256(data).hexdigest().encode(), 1)


def _state_intact(data: bytes) -> bool | None:
    """Whether ``data`` matches the checksum it carries (``None``: it carries none)."""
    match = _CHECKSUM_FIELD.match(data)
    if match is None:
        return None
    blank = data[: match.start(1)] + _CHECKSUM_PLACEHOLDER + data[match.end(1) :]
    return hashlib.sha256(blank).hexdigest().encode() == match.group(1)


class ResumeCheckpoint:
    """Reads and writes the progress of one pruning run in ``directory``: the resume checkpoint, a
    :class:`~optimum_mwanda.modeling.walk.ProgressListener` of the sequential walk.

    Protocol (what the walk does): :meth:`load_state` first (``None``: a new run); for a new run
    :meth:`save_progress` before any :meth:`save_layer`, so that a folder holding data files always holds a
    ``state.json``; then per decoder layer :meth:`save_layer` and :meth:`save_progress` with the layer
    counted as completed. A layer file becomes part of the checkpoint with the next :meth:`save_progress`.
    Use it as a context manager around the run to hold the folder's lock.

    In a data-parallel run every rank reads (the folder must be visible to all ranks: shared storage
    across nodes) and only rank 0 locks and writes, while the others wait.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint_dir {self.directory} exists and is not a folder")
        self._generation = 0  # of the durable state.json; 0: none yet
        self._layers: dict[int, _FileRecord] = {}  # durable (index < completed_layers)
        self._pending: dict[int, _FileRecord] = {}  # written since, not yet in state.json
        self._hidden: _FileRecord | None = None  # durable
        self._hidden_for_layer: int | None = None  # the layer whose inputs _hidden holds
        self._completed = 0
        self._lock: ExitStack | None = None

    # -- the folder's lock ----------------------------------------------------------------------------
    def __enter__(self) -> ResumeCheckpoint:
        def acquire() -> None:
            stack = ExitStack()
            stack.enter_context(folder_lock(self.directory, "a pruning run with this checkpoint_dir"))
            self._lock = stack

        run_on_main_process(acquire)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # -- reading --------------------------------------------------------------------------------------
    def load_state(self, layout: Layout | None = None) -> WalkProgress | None:
        """The saved progress, ``None`` for a new run.

        ``layout`` (the tensors of each decoder layer, as the walk will restore them) lets every value of the
        state be checked against the model before anything else happens. Raises
        :class:`CheckpointMismatchError` when the folder holds another run (or files that are not a
        checkpoint) and :class:`CheckpointCorruptError` when ``state.json`` or a file it relies on is
        damaged, missing or inconsistent. Nothing is changed on disk before every check has passed.
        """
        path = self.directory / STATE_FILE
        if not path.exists():
            if self.directory.exists():
                # Before the first state.json only a half-written .tmp-state.json can be ours.
                foreign = sorted(
                    p.name for p in self.directory.iterdir() if p.name != TMP_PREFIX + STATE_FILE
                )
                if foreign:
                    raise CheckpointMismatchError(
                        f"checkpoint_dir {self.directory} is not empty but holds no {STATE_FILE} "
                        f"({foreign[:3]}): pass an empty or new folder"
                    )
            return None
        document = self._read_state_document(path)
        if document["fingerprint"] != self.fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint_dir {self.directory} holds a run with different arguments (config, calibration "
                "data or model weights); resume with the same arguments and model, or use another folder"
            )
        try:
            saved = document["state"]
            # (``experts`` is absent from states written before mixture-of-experts support)
            progress = WalkProgress(
                # (``experts`` and ``magnitude_pruned`` are absent from states written before they existed)
                **{
                    name: saved[name]
                    for name in _PROGRESS_FIELDS
                    if name in saved or name not in _LATER_FIELDS
                }
            )
            hidden_for_layer = saved.get("hidden_for_layer")
            files = {
                name: _FileRecord(name, int(r["size"]), str(r["sha256"]))
                for name, r in document["files"].items()
            }
            layers = {int(i): files[name] for i, name in document["layers"].items()}
            hidden = files[document["hidden"]] if document["hidden"] is not None else None
            generation = int(document["generation"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointCorruptError(
                f"{path} is not a valid optimum-mwanda checkpoint state ({error!r}); use another folder"
            ) from None
        problem = _state_problem(progress, hidden_for_layer, layers, hidden, files, layout)
        if problem:
            raise CheckpointCorruptError(f"{path} is inconsistent ({problem}); use another folder")
        for record in files.values():
            self._verify(record)
        if layout is not None:
            for index, record in layers.items():
                self._check_layer_file(record, layout[index])
        # Every check passed: from here on files may be deleted.
        self._generation, self._layers, self._hidden, self._pending = generation, layers, hidden, {}
        self._hidden_for_layer = hidden_for_layer
        self._completed = progress.completed_layers
        self._remove_stale()
        progress.resumed_from_layer = progress.completed_layers
        return progress

    def _read_state_document(self, path: Path) -> dict[str, Any]:
        data = path.read_bytes()
        intact = _state_intact(data)
        if intact is False:
            raise CheckpointCorruptError(
                f"{path} is damaged (its checksum does not match its content); use another folder"
            )
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointCorruptError(
                f"{path} is damaged ({error}); the checkpoint cannot be resumed, use another folder"
            ) from None
        if not isinstance(document, dict):
            raise CheckpointCorruptError(f"{path} is damaged (not a JSON object); use another folder")
        if document.get("format_version") != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint_dir {self.directory} was written by an incompatible version of optimum-mwanda "
                f"(format {document.get('format_version')!r}, this version reads {FORMAT_VERSION}); "
                "use another folder"
            )
        if intact is None or "fingerprint" not in document:
            raise CheckpointCorruptError(
                f"{path} is damaged (no checksum or fingerprint); use another folder"
            )
        return document

    def _verify(self, record: _FileRecord, data: bytes | None = None) -> None:
        """Check size and sha256 of ``record``'s file (of ``data`` when given, the bytes read from it)."""
        path = self.directory / record.name
        try:
            size = len(data) if data is not None else path.stat().st_size
            digest = file_sha256(path, data)
        except FileNotFoundError:
            raise CheckpointCorruptError(
                f"{path} is missing but {STATE_FILE} relies on it; the checkpoint cannot be resumed"
            ) from None
        if size != record.size or digest != record.sha256:
            raise CheckpointCorruptError(
                f"{path} is damaged (size or sha256 differs from what {STATE_FILE} recorded); "
                "the checkpoint cannot be resumed, use another folder"
            )

    def _check_layer_file(self, record: _FileRecord, expected: Mapping[str, Sequence[int]]) -> None:
        """A layer file holds exactly the layer's modules, with their shapes (read from its header only)."""
        path = self.directory / record.name
        try:
            with safe_open(str(path), framework="pt") as handle:
                shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
        except Exception as error:  # safetensors' own error type too: an unreadable file is damaged
            raise CheckpointCorruptError(f"{path} is damaged ({error}); use another folder") from None
        if shapes != {name: list(shape) for name, shape in expected.items()}:
            raise CheckpointCorruptError(
                f"{path} does not hold the modules of its decoder layer with their shapes; use another folder"
            )

    def _load_verified(self, record: _FileRecord) -> dict[str, torch.Tensor]:
        # Hash the very bytes that are parsed, so the file cannot change between check and use.
        try:
            data = (self.directory / record.name).read_bytes()
        except FileNotFoundError:
            self._verify(record)  # raises: missing
            raise
        self._verify(record, data)
        return load_safetensors(data)

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        """The pruned weights of finished layer ``index`` (``{}`` for a layer without prunable modules)."""
        record = self._layers.get(index)
        return {} if record is None else self._load_verified(record)

    def load_hidden(self) -> list[torch.Tensor] | None:
        """The hidden states entering the first unfinished layer, one tensor per batch; ``None`` when the
        run saved none (a data-parallel run: they are recomputed from the finished layers)."""
        if self._hidden_for_layer not in (None, self._completed):
            return None
        if self._hidden is None:
            raise CheckpointCorruptError(
                f"{self.directory / STATE_FILE} records no hidden states for an unfinished run; use another folder"
            )
        tensors = self._load_verified(self._hidden)
        return [tensors[f"batch_{i}"] for i in range(len(tensors))]

    # -- writing --------------------------------------------------------------------------------------
    def save_layer(self, index: int, weights: dict[str, torch.Tensor]) -> None:
        """Write the pruned weights of layer ``index``; they count from the next :meth:`save_progress`.
        In a data-parallel run only rank 0 writes; the others wait."""
        run_on_main_process(self._save_layer, index, weights)

    def _save_layer(self, index: int, weights: dict[str, torch.Tensor]) -> None:
        if self._generation == 0:
            raise RuntimeError("ResumeCheckpoint.save_progress must be called before the first save_layer")
        if index in self._layers:
            raise RuntimeError(f"layer {index} is already part of the checkpoint and cannot be replaced")
        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        self._pending[index] = self._write_file(_layer_file(index), data)

    def save_progress(self, progress: WalkProgress, hidden: list[torch.Tensor] | None) -> None:
        """Persist ``hidden`` (the inputs of layer ``progress.completed_layers``, if unfinished) under a new
        generation's name, then the state that points at it; then delete what the previous state used.
        In a data-parallel run only rank 0 writes; the others wait."""
        run_on_main_process(self._save_progress, progress, hidden)

    def _save_progress(self, progress: WalkProgress, hidden: list[torch.Tensor] | None) -> None:
        generation = self._generation + 1
        completed = progress.completed_layers
        hidden_record = None
        if hidden is not None:
            data = save_safetensors(
                {f"batch_{i}": h.detach().cpu().contiguous() for i, h in enumerate(hidden)}
            )
            hidden_record = self._write_file(f"hidden_{generation}.safetensors", data)
        layers = dict(self._layers)
        for index in list(self._pending):
            if index < completed:
                layers[index] = self._pending.pop(index)
        records = list(layers.values()) + ([hidden_record] if hidden_record is not None else [])
        hidden_for_layer = completed if hidden is not None else -1
        state = {name: getattr(progress, name) for name in _PROGRESS_FIELDS}
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "generation": generation,
            "fingerprint": self.fingerprint,
            "state": {"fingerprint": self.fingerprint, **state, "hidden_for_layer": hidden_for_layer},
            "files": {r.name: {"size": r.size, "sha256": r.sha256} for r in records},
            "layers": {str(i): r.name for i, r in sorted(layers.items())},
            "hidden": hidden_record.name if hidden_record is not None else None,
        }
        self._write_file(STATE_FILE, _state_bytes(json.loads(json.dumps(document))))
        # Durable from here on: the previous generation's files are no longer needed.
        self._generation, self._layers, self._hidden = generation, layers, hidden_record
        self._hidden_for_layer, self._completed = hidden_for_layer, completed
        self._remove_stale()

    def _remove_stale(self) -> None:
        """Delete our own files that the durable state does not point at (and that are not pending)."""
        keep = (
            {STATE_FILE} | {r.name for r in self._layers.values()} | {r.name for r in self._pending.values()}
        )
        if self._hidden is not None:
            keep.add(self._hidden.name)
        for path in sorted(self.directory.iterdir()):
            if path.name not in keep and _is_own_name(path.name) and path.is_file():
                _io_event("unlink", path)
                path.unlink(missing_ok=True)

    def _write_file(self, name: str, data: bytes) -> _FileRecord:
        """Write ``data`` to ``name`` atomically and durably (the package's one writer)."""
        if not self.directory.is_dir():
            _io_event("mkdir", self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.directory.parent, _observe)
        target = self.directory / name
        write_file(target, data, durable=True, temp_name=TMP_PREFIX + name, observe=_observe)
        return _FileRecord(name, len(data), file_sha256(target, data))


def _observe(operation: str, path: Path) -> None:
    _io_event(operation, path)  # looked up at each call, so that tests can replace _io_event


def _state_problem(
    progress: WalkProgress,
    hidden_for_layer: Any,
    layers: dict[int, _FileRecord],
    hidden: _FileRecord | None,
    files: dict[str, _FileRecord],
    layout: Layout | None,
) -> str:
    """What is wrong with a state read from ``state.json`` (``""``: nothing), checked before any file is
    touched: a tampered state whose checksum was recomputed must not make the run delete or misuse files."""
    completed = progress.completed_layers
    if not isinstance(completed, int) or isinstance(completed, bool) or completed < 0:
        return f"completed_layers {completed!r}"
    if not all(_is_own_name(name) and not name.startswith(TMP_PREFIX) for name in files):
        return "a file name that is not the checkpoint's"
    if any(not 0 <= index < completed for index in layers):
        return "a layer file beyond the completed layers"
    if hidden_for_layer not in (None, -1, completed):
        return f"hidden_for_layer {hidden_for_layer!r}"
    if not _numbers(progress.layer_sparsity, 0.0, 1.0) or not _numbers(progress.layerwise_signal):
        return "layer_sparsity or layerwise_signal is not a list of numbers"
    if not isinstance(progress.module_sparsity, dict) or not _numbers(
        list(progress.module_sparsity.values()), 0.0, 1.0
    ):
        return "module_sparsity"
    if not isinstance(progress.module_shapes, dict) or not isinstance(progress.experts, dict):
        return "module_shapes or experts"
    if layout is None:
        return ""
    num_layers = len(layout)
    if completed > num_layers:
        return f"completed_layers {completed} of a model with {num_layers} decoder layers"
    if len(progress.layer_sparsity) not in (0, num_layers) or len(progress.layerwise_signal) not in (
        0,
        num_layers,
    ):
        return f"a layer schedule for another number of layers than {num_layers}"
    if any(bool(layout[index]) != (index in layers) for index in range(completed)):
        return "a completed layer without its file, or a file for a layer without prunable modules"
    modules = {name: list(shape) for layer in layout for name, shape in layer.items()}
    shapes = progress.module_shapes
    if not set(progress.module_sparsity) <= set(modules) or any(
        modules.get(k) != v for k, v in shapes.items()
    ):
        return "module results for modules this model does not have"
    if completed < num_layers and hidden_for_layer != -1 and hidden is None:
        return "no hidden states for an unfinished run"
    return ""


def _numbers(values: Any, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(values, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high for v in values
    )


#: the former name of :class:`ResumeCheckpoint`
PruningCheckpoint = ResumeCheckpoint
