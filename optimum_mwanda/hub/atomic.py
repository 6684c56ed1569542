"""Atomic directory writes: build a folder beside its target, then swap it in with renames.

A reader (``from_pretrained``, a user, a crashed job restarting) sees either the old complete folder, the new
complete folder, or nothing: never a folder with ``config.json`` but half the weights.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Markers of a folder that holds a saved model; only such a folder may be replaced wholesale.
_CHECKPOINT_MARKERS = ("config.json", "pruning_report.json")


def check_replaceable(target: str | os.PathLike) -> Path:
    """Validate ``target`` as a save destination and return it as an absolute path.

    A missing path or an empty folder is fine; an existing folder must look like a saved checkpoint, because
    an atomic replace deletes whatever the old folder held (refusing protects e.g. a home directory).
    """
    path = Path(target).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_directory {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in _CHECKPOINT_MARKERS):
        raise ValueError(
            f"save_directory {str(path)!r} is a non-empty folder that does not hold a saved model; saving replaces "
            "the whole folder, so choose a new or empty directory"
        )
    if Path.cwd().absolute().is_relative_to(path):
        raise ValueError(
            f"save_directory {str(path)!r} contains the current working directory; choose another"
        )
    return path


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing an existing ``target`` atomically.

    The old folder is renamed aside first, then ``source`` is renamed in, then the old one is deleted. If the
    second rename fails the old folder is put back, so ``target`` is never missing or mixed.
    """
    if not target.exists():
        os.replace(source, target)
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh hidden sibling folder of ``target``; on success it replaces ``target``.

    On any exception (including ``KeyboardInterrupt``) the sibling is deleted and ``target`` is untouched.
    The sibling is on the same file system as ``target``, so the final rename is atomic.
    """
    path = check_replaceable(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir (not tempfile.mkdtemp, which forces mode 0o700) so the final folder gets the usual umask mode.
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        yield staging
        replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
