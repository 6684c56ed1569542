"""Crash-consistent checkpoint writes that never delete what the package did not write.

A save is one transaction on the target folder:

1. leftovers of an interrupted earlier save are cleaned up (or the previous checkpoint is put back if a save
   died between two renames on a system without an atomic exchange);
2. every new file is written into a hidden sibling folder ``.<name>.tmp-<id>`` (same file system);
3. every entry of the old folder that this package did not write (``src/``, ``eval/``, notes...) is
   hard-linked into the sibling (no data copied; a file that cannot be linked is copied), and so are the
   package's own old files the caller keeps; the manifest of the files the package wrote goes in last;
4. the sibling and the target are swapped in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), so at every
   instant the target path holds either the complete old folder or the complete new one, never a mix and
   never nothing; where the exchange is unavailable, two renames are used and step 1 of the next save
   recovers from a kill between them;
5. the old folder (now the sibling ``.<name>.old-<id>``) is removed after anything a user added to it during
   the save has been moved across.

What the package wrote is listed in :data:`MANIFEST_NAME`; older checkpoints without a manifest are
recognised by their ``pruning_report.json``. Only those files are ever replaced or removed (stale shards
included); a same-named file the package did not write is a conflict unless ``overwrite=True``. The
primitives below (:func:`write_file`, :func:`exchange_paths`, ``os.replace``, ``os.link``) are the only
write and rename operations, which the fault-injection tests patch to fail at every one of them.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

#: the package's record of the files it wrote into a checkpoint folder (written last in every save)
MANIFEST_NAME = ".optimum-mwanda-files.json"
#: names the package writes: transformers' model and tokenizer files, the report, card, plot, eval results
OWN_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model*.safetensors",
    "model.safetensors.index.json",
    "model.sparse.index.json",
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "pruning_report.json",
    "README.md",
    "sparsity_per_layer.png",
    "eval_results.json",
)
#: of those, what a plain transformers checkpoint holds (replaced like ``save_pretrained`` would)
_MODEL_FILE_PATTERNS = OWN_PATTERNS[:-4]
_LEGACY_MARKER = "pruning_report.json"
_TMP, _OLD = ".tmp-", ".old-"
_TEMP_FILE = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{8}$")


class CheckpointConflictError(ValueError):
    """The target folder holds files this package did not write where it would write (or is no checkpoint)."""


# -- primitives (the only writes and renames; fault-injection tests patch them) -------------------------
def write_file(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically: a temporary sibling, then ``os.replace``."""
    path = Path(path)
    staging = path.with_name(f".{path.name}{_TMP}{uuid.uuid4().hex[:8]}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        # open() rather than tempfile, whose files are private (0600): this one joins a shared folder.
        with open(staging, "xb") as handle:
            handle.write(payload)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(first: Path, second: Path) -> None:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``OSError`` where unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(first))


# -- what is ours ----------------------------------------------------------------------------------------
def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def read_manifest(folder: Path) -> list[str] | None:
    """The files the package wrote into ``folder`` (``None`` without a readable manifest)."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [Path(str(name)).name for name in files]  # never a path outside the folder


def _is_model_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


def own_files(folder: Path) -> set[str]:
    """Top-level names in ``folder`` that this package wrote (its manifest, or for a checkpoint written
    before manifests existed, the package's file names beside its ``pruning_report.json``)."""
    names = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    listed = read_manifest(folder)
    if listed is not None:
        return (set(listed) & names) | ({MANIFEST_NAME} & names)
    if _LEGACY_MARKER in names and _is_model_config(folder / "config.json"):
        return {name for name in names if _matches(name, OWN_PATTERNS)}
    return set()


def replaceable_files(folder: Path) -> set[str]:
    """Names in ``folder`` a save may drop or replace without asking: the package's own files, and in a
    plain transformers checkpoint (no manifest, no report) its model and tokenizer files, as
    ``save_pretrained`` itself replaces them (stale shards included)."""
    ours = own_files(folder)
    if ours or not folder.is_dir() or not _is_model_config(folder / "config.json"):
        return ours
    return {entry.name for entry in folder.iterdir() if _matches(entry.name, _MODEL_FILE_PATTERNS)}


def check_replaceable(target: str | os.PathLike, overwrite: bool = False, writes: Iterable[str] = ()) -> Path:
    """Validate ``target`` as a save destination; return its absolute real path.

    Fine: a missing path, an empty folder, a folder holding a model checkpoint (its other files are kept).
    A folder with files but no model config (``config.json`` with a ``model_type``) is refused unless
    ``overwrite``, and so is any of the names in ``writes`` that exists there and was not written by the
    package (in a plain transformers checkpoint: anything but model and tokenizer files).
    """
    path = Path(os.path.realpath(Path(target).expanduser()))
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_directory {str(path)!r} exists and is not a directory")
    if Path.cwd().resolve().is_relative_to(path):
        raise ValueError(
            f"save_directory {str(path)!r} contains the current working directory; choose another"
        )
    if not path.is_dir():
        return path
    names = {entry.name for entry in path.iterdir()}
    if names and not overwrite and not own_files(path) and not _is_model_config(path / "config.json"):
        raise CheckpointConflictError(
            f"save_directory {str(path)!r} holds files but no saved model (no config.json with a model_type): "
            "choose a new or empty folder, or pass overwrite=True to write the checkpoint beside those files "
            "(only files with the checkpoint's own names are replaced)"
        )
    clashes = sorted((set(writes) & names) - replaceable_files(path))
    if clashes and not overwrite:
        raise CheckpointConflictError(
            f"save_directory {str(path)!r} holds {', '.join(clashes)}, not written by optimum-mwanda; saving "
            "would replace it: move it away, or pass overwrite=True"
        )
    return path


# -- recovery and cleanup --------------------------------------------------------------------------------
def _siblings(target: Path, marker: str) -> list[Path]:
    prefix = f".{target.name}{marker}"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def _rescue_foreign(old: Path, target: Path) -> None:
    """Move entries of the swapped-out ``old`` folder that a save may not drop and that ``target`` lacks into
    ``target`` (a file a user created in the old folder while the save was running)."""
    droppable = replaceable_files(old) | {MANIFEST_NAME}
    for entry in list(old.iterdir()):
        if entry.name not in droppable and not os.path.lexists(target / entry.name):
            os.replace(entry, target / entry.name)


def _swapped_out_name(target: Path) -> str | None:
    """The staging name of the save that produced ``target`` (recorded in its manifest)."""
    try:
        return str(json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))["staging"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover(target: Path) -> None:
    """Finish what an interrupted save left: put the previous checkpoint back if the target is missing,
    move user files out of an old copy, delete stale staging folders and temporary files."""
    olds = _siblings(target, _OLD)
    if not os.path.lexists(target) and olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        logger.warning("recovering %s from %s (an earlier save was interrupted)", target, newest.name)
        os.replace(newest, target)
        olds.remove(newest)
    for old in olds:
        if target.is_dir():
            _rescue_foreign(old, target)
        shutil.rmtree(old)
    swapped_out = _swapped_out_name(target) if target.is_dir() else None
    for staging in _siblings(target, _TMP):
        if staging.name == swapped_out:
            # Killed right after the exchange: this staging name now holds the previous folder.
            _rescue_foreign(staging, target)
        shutil.rmtree(staging)
    if target.is_dir():
        for entry in target.iterdir():  # temporary files of an interrupted write_file
            match = _TEMP_FILE.match(entry.name)
            if match and _matches(match.group(1), (*OWN_PATTERNS, MANIFEST_NAME)) and entry.is_file():
                entry.unlink()


# -- the transaction -------------------------------------------------------------------------------------
def _link_tree(source: Path, destination: Path) -> None:
    """Recreate ``source`` at ``destination`` with hard links (a copy where linking is impossible)."""
    if source.is_symlink() or not source.is_dir():
        try:
            os.link(source, destination, follow_symlinks=False)
        except OSError:
            if source.is_symlink():
                os.symlink(os.readlink(source), destination)
            else:
                shutil.copy2(source, destination)
        return
    os.mkdir(destination)
    _copy_mode_and_owner(source, destination)
    for entry in source.iterdir():
        _link_tree(entry, destination / entry.name)


def _copy_mode_and_owner(source: Path, destination: Path) -> None:
    """A recreated folder keeps its mode and, where permitted (root), its owner."""
    shutil.copymode(source, destination)
    stat = source.stat()
    if (stat.st_uid, stat.st_gid) != (os.getuid(), os.getgid()):
        try:
            os.chown(destination, stat.st_uid, stat.st_gid)
        except OSError:  # only root may give a folder away; the mode is kept either way
            pass


def _swap_in(staging: Path, target: Path) -> None:
    """Make the complete ``staging`` folder the ``target``; the commit point of a save."""
    if not os.path.lexists(target):
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}{_OLD}{uuid.uuid4().hex[:12]}")
    try:
        exchange_paths(staging, target)
        swapped_out = staging  # now holds the previous folder
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # No atomic exchange here: a kill between these two renames leaves only `old`, which the next
        # save (recover) renames back.
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
        swapped_out = old
    # Committed. What follows only tidies up; a failure here is left for the next save's recover().
    try:
        _rescue_foreign(swapped_out, target)
        shutil.rmtree(swapped_out)
    except OSError as err:
        logger.warning(
            "saved %s, but could not remove the previous copy %s (%s); the next save will",
            target,
            swapped_out,
            err,
        )


@contextmanager
def checkpoint_transaction(
    target: str | os.PathLike, *, overwrite: bool = False, keep_own: bool = False
) -> Iterator[Path]:
    """Yield an empty staging folder; the files written there replace the package's files in ``target``.

    On success the folder at ``target`` becomes: the staged files, every entry the package did not write
    (kept as it was), and with ``keep_own`` also the package's old files that were not restaged (a card
    rewrite keeps the weights); without it the package's old files are dropped (stale shards). On any
    exception ``target`` is untouched and the staging folder is removed.
    """
    path = check_replaceable(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    # os.mkdir (not tempfile.mkdtemp, which forces mode 0o700) so the final folder gets the usual umask mode.
    staging = path.with_name(f".{path.name}{_TMP}{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)
    try:
        yield staging
        written = sorted(entry.name for entry in staging.iterdir())
        check_replaceable(path, overwrite, writes=written)
        _normalize_modes(staging, written)
        if path.is_dir():
            own = own_files(path)
            replaceable = replaceable_files(path)
            for entry in path.iterdir():
                name = entry.name
                if name in written or name == MANIFEST_NAME:
                    continue
                if name in replaceable and not (keep_own and name in own):
                    continue  # the package's stale file (an old shard, a card no longer written)
                _link_tree(entry, staging / name)
            kept_own = sorted(
                own & {entry.name for entry in staging.iterdir()} - set(written) - {MANIFEST_NAME}
            )
            _copy_mode_and_owner(path, staging)
        else:
            kept_own = []
        manifest = {
            "files": sorted({*written, *kept_own}),
            "writer": "optimum-mwanda",
            "staging": staging.name,
        }
        write_file(staging / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # unswapped staging, or the previous copy after a commit
        raise


def _normalize_modes(folder: Path, names: list[str]) -> None:
    """Give the package's new files the usual mode (0666 minus the umask): some writers create 0600 files."""
    umask = _umask()
    for name in names:
        entry = folder / name
        if entry.is_file() and not entry.is_symlink():
            os.chmod(entry, 0o666 & ~umask)


def _umask() -> int:
    # Read without changing it where Linux reports it (os.umask can only read by setting, racing threads).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
