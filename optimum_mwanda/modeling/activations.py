"""Where the calibration activations live between decoder layers.

Only one layer's inputs (one tensor per calibration batch) are kept at a time. They can be moved off the
accelerator to CPU memory, and past a byte budget spilled to files in a temporary folder, so that peak
memory is one decoder layer plus one layer's activations (plus the budget).

The spill folder (``optimum-mwanda-activations-*`` in the system temporary folder, or in ``spill_dir``) is
the run's own: it holds an owner file with the process id and host, and is removed when the store closes.
A run killed before that leaves it behind, so every new spill folder first removes those of dead processes
on this host: only folders with such an owner file, never anything else in the temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from ..files import write_file

SPILL_PREFIX = "optimum-mwanda-activations-"
#: the file inside a spill folder that names the process that owns it
OWNER_FILE = ".optimum-mwanda-owner.json"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_stale_spill_folders(parent: str | os.PathLike | None = None) -> list[Path]:
    """Delete the spill folders in ``parent`` (default: the system temporary folder) that a process of this
    host which no longer runs left behind; returns them. A folder without a readable owner file is not
    ours (or still being created) and is left alone, and so is one of a live process or another host."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    removed = []
    host = socket.gethostname()
    for folder in sorted(parent.glob(SPILL_PREFIX + "*")):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
            pid, owner_host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if folder.is_symlink() or owner_host != host or pid == os.getpid() or _process_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class ActivationStore:
    """A list of per-batch hidden-state tensors with a storage device and an in-memory byte budget.

    Args:
        tensors: the initial tensors (one per batch).
        device: where to keep them (``None``: leave each where it was produced, e.g. on the GPU).
        max_memory_bytes: above this many bytes held in memory, further batches go to disk.
        spill_dir: parent folder for spilled files (a folder owned by this run is made inside it; default:
            the system temporary folder). Removed by :meth:`close`.
    """

    def __init__(
        self,
        tensors: list[torch.Tensor],
        device: str | torch.device | None = None,
        max_memory_bytes: int | None = None,
        spill_dir: str | os.PathLike | None = None,
    ):
        if max_memory_bytes is not None and max_memory_bytes < 0:
            raise ValueError(f"max_memory_bytes must be >= 0, got {max_memory_bytes}")
        self.device = torch.device(device) if device is not None else None
        self.max_memory_bytes = max_memory_bytes
        self._spill_parent = spill_dir
        self._spill_dir: Path | None = None
        self._memory: dict[int, torch.Tensor] = {}
        self._on_disk: set[int] = set()
        self._length = 0
        for tensor in tensors:
            self[self._length] = tensor

    def __len__(self) -> int:
        return self._length

    @property
    def bytes_in_memory(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._memory.values())

    @property
    def batches_on_disk(self) -> int:
        return len(self._on_disk)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self._memory:
            return self._memory[index]
        if index in self._on_disk:
            return torch.load(self._path(index), weights_only=True)
        raise IndexError(index)

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self.device is not None:
            tensor = tensor.to(self.device)
        size = tensor.numel() * tensor.element_size()
        self._memory.pop(index, None)
        if self.max_memory_bytes is not None and self.bytes_in_memory + size > self.max_memory_bytes:
            cpu = tensor.cpu()
            # Scratch data, rewritten each layer: atomic (never a torn file), not worth an fsync.
            write_file(self._path(index), lambda handle: torch.save(cpu, handle), durable=False)
            self._on_disk.add(index)
        else:
            self._on_disk.discard(index)
            self._memory[index] = tensor
        self._length = max(self._length, index + 1)

    def _path(self, index: int) -> Path:
        if self._spill_dir is None:
            remove_stale_spill_folders(self._spill_parent)
            folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self._spill_parent))
            owner = {"pid": os.getpid(), "host": socket.gethostname()}
            write_file(folder / OWNER_FILE, json.dumps(owner), durable=False)
            self._spill_dir = folder
        return self._spill_dir / f"batch_{index}.pt"

    def as_list(self) -> list[torch.Tensor]:
        return [self[i] for i in range(len(self))]

    def close(self) -> None:
        """Drop everything and delete spilled files."""
        self._memory.clear()
        self._on_disk.clear()
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
