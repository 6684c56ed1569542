"""The package's one atomic file writer, its sha256 helper and its folder lock (standard library only, so
that every layer may use them: saves, the resume checkpoint, spilled activations, the CLI's outputs).

What :func:`write_file` guarantees: a reader sees the old file or the complete new one, never a part,
whatever instant the process dies at (a temporary sibling, then an atomic rename). With ``durable=True``
(the default) the file is also fsynced before the rename and its folder after it, so that once the call
returns the new content survives a power loss or kernel crash too; with ``durable=False`` it survives
process crashes only (a power loss shortly after may leave the old file, or an empty one on some file
systems).
"""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

_TMP = ".tmp-"


class FolderInUseError(RuntimeError):
    """Another save or pruning run (of this or another process) holds the folder's lock."""


Payload = bytes | str | Callable[[BinaryIO], object]
Observer = Callable[[str, Path], None]


def _no_observer(operation: str, path: Path) -> None:
    pass


def write_file(
    path: str | os.PathLike,
    data: Payload,
    *,
    durable: bool = True,
    temp_name: str | None = None,
    observe: Observer | None = None,
) -> int:
    """Write ``data`` to ``path`` atomically: a temporary sibling, then ``os.replace``. Returns the size.

    A reader sees the old file or the complete new one, never a part, whatever instant the process dies at.
    With ``durable`` the file is fsynced before the rename and its folder after it, so the new content also
    survives a power loss once this returns; without, a power loss shortly after may leave the old file, or
    an empty one on some file systems.

    Args:
        data: bytes, text (UTF-8), or a callable that writes into the binary file handle it is given.
        temp_name: the temporary file's name in the same folder (default ``.<name>.tmp-<random>``).
        observe: called as ``observe(operation, path)`` right before each step (``open``, ``write`` (between
            the two halves of the bytes), ``fsync``, ``rename``, ``fsync-dir``): a seam for fault injection.
    """
    path = Path(path)
    observe = observe or _no_observer
    staging = path.with_name(temp_name or f".{path.name}{_TMP}{uuid.uuid4().hex[:12]}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    observe("open", staging)
    try:
        # open() rather than tempfile, whose files are private (0600): this one joins a shared folder.
        with open(staging, "wb" if temp_name else "xb") as handle:
            if callable(payload):
                payload(handle)
                observe("write", staging)
            else:
                view = memoryview(payload)
                handle.write(view[: len(view) // 2])
                observe("write", staging)  # a kill here leaves a torn temporary file
                handle.write(view[len(view) // 2 :])
            size = handle.tell()
            if durable:
                handle.flush()
                observe("fsync", staging)
                os.fsync(handle.fileno())
        observe("rename", path)
        os.replace(staging, path)
    except Exception:
        # (An interrupt leaves the temporary file as a kill would: the folder's owner cleans it up.)
        try:
            staging.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    if durable:
        fsync_directory(path.parent, observe)
    return size


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: Path, observe: Observer | None = None) -> None:
    """Make a rename (or a new entry) in ``directory`` durable; not possible (nor needed) on Windows."""
    (observe or _no_observer)("fsync-dir", directory)
    if os.name != "nt":
        _fsync_path(directory)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (hard-linked files too: their new names are entries)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not (Path(root) / name).is_symlink():
                _fsync_path(Path(root) / name)
        fsync_directory(Path(root))


def file_sha256(path: str | os.PathLike, data: bytes | None = None) -> str:
    """Hex SHA-256 of a file, read in 16 MiB blocks (of ``data`` instead, when given: the bytes read)."""
    digest = hashlib.sha256()
    if data is not None:
        digest.update(data)
        return digest.hexdigest()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


# -- locks -----------------------------------------------------------------------------------------------
def lock_path_for(folder: Path) -> Path:
    """The lock file of ``folder``: a hidden sibling, so that it survives the folder being swapped."""
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "a save") -> Iterator[Path]:
    """Hold the lock of ``folder`` for a ``with`` block; :class:`FolderInUseError` if another holds it.

    The lock file (:func:`lock_path_for`) records the owner's pid and host for the error message. The lock
    itself is an ``flock`` on that file, which the kernel drops when its owner dies: the lock file of a
    killed process is taken over, never mistaken for a live one (nor the reverse, after a pid is reused).
    The file is removed when the block ends.
    """
    import fcntl

    path = lock_path_for(Path(folder))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise FolderInUseError(
                f"{str(folder)!r} is in use by {owner} (its lock {path.name} is held): wait for that save or "
                f"pruning run to finish, or use another folder ({what} was refused)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous owner removed the file between our open and flock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({what})\n".encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:  # left behind: the next owner takes it over
            pass
        os.close(fd)
