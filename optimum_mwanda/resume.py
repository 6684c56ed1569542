"""Resumable pruning runs: progress persisted after every decoder layer, crash-consistently.

A checkpoint folder holds only files with these names (nothing else is ever written, replaced or deleted):

- ``state.json``: the run's fingerprint (config, calibration tokens, model layout *and weights*), the number
  of decoder layers finished, the layer schedule, the per-module results so far, and the name, size and
  sha256 of every data file it relies on; it carries a sha256 of its own content as well;
- ``layer_<i>.safetensors``: the pruned weights of decoder layer ``i``;
- ``hidden_<g>.safetensors``: the hidden states entering the next unfinished layer (one tensor per batch),
  ``g`` the generation of the state that points at it;
- ``.tmp-<one of the names above>``: a file being written.

Crash consistency: every file is written under its ``.tmp-`` name, fsynced, renamed into place and its folder
fsynced. A data file is never replaced while the durable ``state.json`` points at it (the hidden states of
each generation get a new name), ``state.json`` is written last and is the only file that says what is
valid, and the files of the previous generation are deleted only once the new ``state.json`` is durable.
So a run killed at any instant leaves either the previous or the next state, complete; files that no state
points at (a half-written ``.tmp-*``, a layer pruned after the last state) are ignored, overwritten by the
resumed run, or deleted once a newer state is durable. Checksums are verified when a checkpoint is loaded,
so a damaged file is a :class:`CheckpointCorruptError`, never a silently different model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from .distributed import run_on_main_process
from .modeling import read_parameter

STATE_FILE = "state.json"
TMP_PREFIX = ".tmp-"
FORMAT_VERSION = 2
_LAYER_NAME = re.compile(r"layer_(\d+)\.safetensors")
_HIDDEN_NAME = re.compile(r"hidden_(\d+)\.safetensors")
_HASH_CHUNK = 16 * 2**20


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed; the model is left untouched."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint folder belongs to a run with other arguments (or another model)."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is damaged, missing or not what ``state.json`` recorded."""


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
@dataclass
class ResumeState:
    """The progress of a run, as ``state.json`` records it."""

    fingerprint: str
    completed_layers: int = 0
    layer_sparsity: list[float] = field(default_factory=list)
    layerwise_signal: list[float] = field(default_factory=list)
    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    #: per fused-experts module of the finished layers: routed tokens, fallback, routing shares per expert
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the layer whose inputs the saved hidden states are: ``-1`` when the run saved none (data-parallel
    #: runs recompute them from the finished layers)
    hidden_for_layer: int | None = None

    @property
    def hidden_saved(self) -> bool:
        """Whether the checkpoint holds the inputs of layer ``completed_layers``."""
        return self.hidden_for_layer is None or self.hidden_for_layer == self.completed_layers


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


class PruningCheckpoint:
    """Reads and writes the progress of one pruning run in ``directory``.

    Protocol (what the sequential walk does): :meth:`load_state` first (``None``: a new run); for a new run
    :meth:`save_progress` before any :meth:`save_layer`, so that a folder holding data files always holds a
    ``state.json``; then per decoder layer :meth:`save_layer` and :meth:`save_progress` with the layer
    counted as completed. A layer file becomes part of the checkpoint with the next :meth:`save_progress`.

    In a data-parallel run every rank reads (the folder must be visible to all ranks: shared storage
    across nodes) and only rank 0 writes, while the others wait.
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

    # -- reading --------------------------------------------------------------------------------------
    def load_state(self) -> ResumeState | None:
        """The saved state, ``None`` for a new run.

        Raises :class:`CheckpointMismatchError` when the folder holds another run (or files that are not a
        checkpoint) and :class:`CheckpointCorruptError` when ``state.json`` or a file it relies on is
        damaged or missing. Nothing is changed on disk before every check has passed.
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
            state = ResumeState(**document["state"])
            files = {
                name: _FileRecord(name, int(r["size"]), str(r["sha256"]))
                for name, r in document["files"].items()
            }
            layers = {int(i): files[name] for i, name in document["layers"].items()}
            hidden = files[document["hidden"]] if document["hidden"] is not None else None
            generation = int(document["generation"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointCorruptError(
                f"{path} is not a valid optimum-mwanda checkpoint state ({error!r}); use another folder"
            ) from None
        if any(index >= state.completed_layers for index in layers) or not all(
            _is_own_name(name) and not name.startswith(TMP_PREFIX) for name in files
        ):
            raise CheckpointCorruptError(f"{path} is inconsistent; use another folder")
        for record in files.values():
            self._verify(record)
        self._generation, self._layers, self._hidden, self._pending = generation, layers, hidden, {}
        self._remove_stale()
        return state

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
        digest = hashlib.sha256()
        try:
            if data is not None:
                size = len(data)
                digest.update(data)
            else:
                size = path.stat().st_size
                with open(path, "rb") as handle:
                    while chunk := handle.read(_HASH_CHUNK):
                        digest.update(chunk)
        except FileNotFoundError:
            raise CheckpointCorruptError(
                f"{path} is missing but {STATE_FILE} relies on it; the checkpoint cannot be resumed"
            ) from None
        if size != record.size or digest.hexdigest() != record.sha256:
            raise CheckpointCorruptError(
                f"{path} is damaged (size or sha256 differs from what {STATE_FILE} recorded); "
                "the checkpoint cannot be resumed, use another folder"
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

    def load_hidden(self) -> list[torch.Tensor]:
        """The hidden states entering the first unfinished layer, one tensor per batch."""
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
            raise RuntimeError("PruningCheckpoint.save_progress must be called before the first save_layer")
        if index in self._layers:
            raise RuntimeError(f"layer {index} is already part of the checkpoint and cannot be replaced")
        data = save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        self._pending[index] = self._write_file(_layer_file(index), data)

    def save_progress(self, state: ResumeState, hidden: list[torch.Tensor] | None) -> None:
        """Persist ``hidden`` (the inputs of layer ``state.completed_layers``, if unfinished) under a new
        generation's name, then the state that points at it; then delete what the previous state used.
        In a data-parallel run only rank 0 writes; the others wait."""
        state.hidden_for_layer = state.completed_layers if hidden is not None else -1
        run_on_main_process(self._save_progress, state, hidden)

    def _save_progress(self, state: ResumeState, hidden: list[torch.Tensor] | None) -> None:
        generation = self._generation + 1
        hidden_record = None
        if hidden is not None:
            data = save_safetensors(
                {f"batch_{i}": h.detach().cpu().contiguous() for i, h in enumerate(hidden)}
            )
            hidden_record = self._write_file(f"hidden_{generation}.safetensors", data)
        layers = dict(self._layers)
        for index in list(self._pending):
            if index < state.completed_layers:
                layers[index] = self._pending.pop(index)
        records = list(layers.values()) + ([hidden_record] if hidden_record is not None else [])
        document: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "generation": generation,
            "fingerprint": self.fingerprint,
            "state": asdict(state),
            "files": {r.name: {"size": r.size, "sha256": r.sha256} for r in records},
            "layers": {str(i): r.name for i, r in sorted(layers.items())},
            "hidden": hidden_record.name if hidden_record is not None else None,
        }
        self._write_file(STATE_FILE, _state_bytes(document))
        # Durable from here on: the previous generation's files are no longer needed.
        self._generation, self._layers, self._hidden = generation, layers, hidden_record
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
        """Write ``data`` to ``name`` atomically and durably: temporary file, fsync, rename, fsync folder."""
        if not self.directory.is_dir():
            _io_event("mkdir", self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            _fsync_directory(self.directory.parent)
        tmp = self.directory / (TMP_PREFIX + name)
        _io_event("open", tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            half = len(view) // 2
            _write_all(fd, view[:half])
            _io_event("write", tmp)  # a kill here leaves a torn temporary file
            _write_all(fd, view[half:])
            _io_event("fsync", tmp)
            os.fsync(fd)
        finally:
            os.close(fd)
        target = self.directory / name
        _io_event("rename", target)
        os.replace(tmp, target)
        _fsync_directory(self.directory)
        return _FileRecord(name, len(data), hashlib.sha256(data).hexdigest())


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _fsync_directory(directory: Path) -> None:
    """Make a rename (or a new entry) in ``directory`` durable; not possible (nor needed) on Windows."""
    _io_event("fsync-dir", directory)
    if os.name == "nt":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
