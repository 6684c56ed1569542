"""Resumable pruning runs: progress persisted after every decoder layer.

A checkpoint folder holds

- ``state.json``: a fingerprint of the run (config, calibration tokens, model layout), the number of
  decoder layers finished, the layer schedule and the per-module results so far;
- ``layer_<i>.safetensors``: the pruned weights of decoder layer ``i``;
- ``hidden.safetensors``: the hidden states entering the next unfinished layer, one tensor per batch.

Every file is written to a temporary name and renamed into place, and ``state.json`` is written last, so
a run killed at any moment leaves a folder whose state describes only files that are complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .distributed import run_on_main_process

STATE_FILE = "state.json"
HIDDEN_FILE = "hidden.safetensors"
FORMAT_VERSION = 1


class CheckpointMismatchError(ValueError):
    """The checkpoint folder belongs to a run with other arguments."""


def run_fingerprint(config: dict[str, Any], tensors: list[torch.Tensor], extra: dict[str, Any]) -> str:
    """A hash of everything that decides the masks: config, calibration tensors, model layout."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    for tensor in tensors:
        data = tensor.detach().cpu().contiguous()
        digest.update(str((tuple(data.shape), str(data.dtype))).encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class ResumeState:
    """What ``state.json`` records."""

    fingerprint: str
    completed_layers: int = 0
    layer_sparsity: list[float] = field(default_factory=list)
    layerwise_signal: list[float] = field(default_factory=list)
    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_shapes: dict[str, list[int]] = field(default_factory=dict)
    #: the layer whose inputs ``hidden.safetensors`` holds: ``-1`` when the run saved none (data-parallel
    #: runs recompute them), ``None`` in states written before this field (the file matches the state)
    hidden_for_layer: int | None = None
    format_version: int = FORMAT_VERSION

    @property
    def hidden_saved(self) -> bool:
        """``hidden.safetensors`` holds the inputs of layer ``completed_layers``."""
        return self.hidden_for_layer is None or self.hidden_for_layer == self.completed_layers


class PruningCheckpoint:
    """Reads and writes the progress of one pruning run in ``directory``.

    In a data-parallel run every rank reads (the folder must be visible to all ranks: shared storage
    across nodes) and only rank 0 writes, while the others wait.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(f"checkpoint_dir {self.directory} exists and is not a folder")

    # -- reading --------------------------------------------------------------------------------------
    def load_state(self) -> ResumeState | None:
        """The saved state, ``None`` for a new run; raises when the folder holds another run."""
        path = self.directory / STATE_FILE
        if not path.exists():
            if self.directory.exists() and any(self.directory.iterdir()):
                leftovers = sorted(p.name for p in self.directory.iterdir() if not p.name.startswith(".tmp"))
                if leftovers:
                    raise CheckpointMismatchError(
                        f"checkpoint_dir {self.directory} is not empty but holds no {STATE_FILE} "
                        f"({leftovers[:3]}): pass an empty or new folder"
                    )
            return None
        data = json.loads(path.read_text())
        if data.get("format_version") != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint_dir {self.directory} was written by an incompatible version of optimum-mwanda"
            )
        state = ResumeState(**data)
        if state.fingerprint != self.fingerprint:
            raise CheckpointMismatchError(
                f"checkpoint_dir {self.directory} holds a run with different arguments (config, calibration "
                "data or model); resume with the same arguments or use another folder"
            )
        return state

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.directory / f"layer_{index}.safetensors"))

    def load_hidden(self) -> list[torch.Tensor]:
        tensors = load_file(str(self.directory / HIDDEN_FILE))
        return [tensors[f"batch_{i}"] for i in range(len(tensors))]

    # -- writing --------------------------------------------------------------------------------------
    def save_layer(self, index: int, weights: dict[str, torch.Tensor]) -> None:
        run_on_main_process(self._save_layer, index, weights)

    def _save_layer(self, index: int, weights: dict[str, torch.Tensor]) -> None:
        self._atomic_save(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()}, f"layer_{index}.safetensors"
        )

    def save_progress(self, state: ResumeState, hidden: list[torch.Tensor] | None) -> None:
        """Persist hidden states (if any), then the state that points at them."""
        state.hidden_for_layer = state.completed_layers if hidden is not None else -1
        run_on_main_process(self._save_progress, state, hidden)

    def _save_progress(self, state: ResumeState, hidden: list[torch.Tensor] | None) -> None:
        if hidden is not None:
            self._atomic_save(
                {f"batch_{i}": h.detach().cpu().contiguous() for i, h in enumerate(hidden)}, HIDDEN_FILE
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{STATE_FILE}"
        tmp.write_text(json.dumps(state.__dict__, indent=2))
        os.replace(tmp, self.directory / STATE_FILE)

    def _atomic_save(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".tmp-{name}"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.directory / name)
