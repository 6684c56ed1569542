"""Unwritable folders for tests of the checks that refuse them (also when the tests run as root)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[Path]:
    """``folder`` without write permission (its sub-folders keep theirs). Root ignores permission bits, so there ``os.access`` is also
    made to answer as it does for anyone else (the fault being simulated is "this folder is read-only")."""
    folder.mkdir(parents=True, exist_ok=True)
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    real_access = os.access
    patch = pytest.MonkeyPatch()
    if os.geteuid() == 0:

        def access(path, flags, *args, **kwargs):
            resolved = Path(os.path.abspath(path))
            if flags & os.W_OK and resolved == folder:  # like chmod: its sub-folders keep their own mode
                return False
            return real_access(path, flags, *args, **kwargs)

        patch.setattr(os, "access", access)
    try:
        yield folder
    finally:
        patch.undo()
        folder.chmod(mode)
