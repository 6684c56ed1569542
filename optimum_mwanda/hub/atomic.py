"""The package's file writes: one atomic file writer, one sha256 helper, folder locks, and the
crash-consistent save transaction that never deletes what the package did not write.

A save is one transaction on the target folder, under the folder's lock (:func:`folder_lock`):

1. leftovers of an interrupted earlier save are cleaned up, or the previous folder is put back if a save
   died between two renames on a system without an atomic exchange. Only siblings this package made are
   touched: a staging folder holds a manifest naming that very folder; an old copy is named in the manifest
   of the target or of a staging folder;
2. every new file is written into a hidden sibling folder ``.<name>.tmp-<random>`` (same file system),
   whose manifest is written first and says so;
3. every entry of the old folder that a save may not drop (``src/``, ``eval/``, notes...) is hard-linked
   into the sibling (no data copied; a file that cannot be linked is copied), and so are the package's own
   old files the caller keeps; the final manifest of the files the package wrote goes in last; with
   ``durable`` every file and folder of the sibling is fsynced;
4. the sibling and the target are swapped in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), so at every
   instant the target path holds either the complete old folder or the complete new one, never a mix and
   never nothing; where the exchange is unavailable, two renames are used and step 1 of the next save
   recovers from a kill between them;
5. the old folder is compared with the new one, entry by entry and into sub-folders: an entry a user added
   or replaced during the save (a new ``eval/new.txt``, a ``trainer_state.json`` rewritten by
   write-then-rename) is moved across, then the old folder is removed.

What the package wrote is listed in :data:`MANIFEST_NAME`; older saved folders without a manifest are
recognised by their ``pruning_report.json``. Only files with the exact names a save writes are replaced,
and only the package's own files (stale shards included) are dropped; in a plain transformers folder the
stale weights its index names. A same-named file the package did not write is a conflict unless
``overwrite=True``. The package's one atomic writer (:func:`optimum_mwanda.files.write_file`),
:func:`exchange_paths`, ``os.replace`` and ``os.link`` are the only write and rename operations, which the
fault-injection tests patch to fail at every one of them.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..files import (
    FolderInUseError,
    file_sha256,
    folder_lock,
    fsync_directory,
    fsync_tree,
    lock_path_for,
    write_file,
)

__all__ = [
    "MANIFEST_NAME",
    "CheckpointConflictError",
    "FolderInUseError",
    "check_replaceable",
    "checkpoint_transaction",
    "save_transaction",
    "exchange_paths",
    "file_sha256",
    "folder_lock",
    "fsync_directory",
    "lock_path_for",
    "recover",
    "write_file",
]

logger = logging.getLogger(__name__)

#: the package's record of the files it wrote into a saved folder (written last in every save)
MANIFEST_NAME = ".optimum-mwanda-files.json"
#: the names a save writes under fixed names: transformers' model and tokenizer files, the report, card,
#: plot and evaluation results (weight shards are named by their index, see :func:`weight_files`)
OWN_NAMES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model.sparse.safetensors",
    "model.sparse.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
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
#: of those, what a plain transformers checkpoint holds (replaced like ``save_pretrained`` would, when written)
_MODEL_NAMES = OWN_NAMES[:-4]
_DENSE_INDEX, _SPARSE_INDEX = "model.safetensors.index.json", "model.sparse.index.json"
_LEGACY_MARKER = "pruning_report.json"
_TMP, _OLD = ".tmp-", ".old-"
_WRITER = "optimum-mwanda"
_TEMP_FILE = re.compile(r"^\.(.+)\.tmp-[0-9a-f]{12}$")


class CheckpointConflictError(ValueError):
    """The target folder holds files this package did not write where it would write (or holds no saved model)."""


# -- primitives (the only writes and renames; fault-injection tests patch them) -------------------------
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
def _read_json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _manifest(folder: Path) -> dict | None:
    data = _read_json_object(folder / MANIFEST_NAME)
    if data is None or data.get("writer") != _WRITER or not isinstance(data.get("files"), list):
        return None
    return data


def _names(value: object) -> list[str]:
    """File names listed in a manifest field (never a path outside the folder)."""
    return [Path(str(name)).name for name in value] if isinstance(value, list) else []


def read_manifest(folder: Path) -> list[str] | None:
    """The files the package wrote into ``folder`` (``None`` without a readable manifest)."""
    data = _manifest(folder)
    return None if data is None else _names(data["files"])


def _is_model_config(path: Path) -> bool:
    data = _read_json_object(path)
    return data is not None and ("model_type" in data or "architectures" in data)


def weight_files(folder: Path) -> set[str]:
    """The weight files of the model in ``folder`` that transformers (or a compressed load) reads: the
    single-file weights, and each index with the shards it names."""
    names = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    found = names & {"model.safetensors", "model.sparse.safetensors"}
    for index_name in (_DENSE_INDEX, _SPARSE_INDEX):
        if index_name not in names:
            continue
        found.add(index_name)
        index = _read_json_object(folder / index_name) or {}
        weight_map = index.get("weight_map")
        shards = {Path(str(s)).name for s in weight_map.values()} if isinstance(weight_map, dict) else set()
        if index_name == _SPARSE_INDEX:  # the copy of the dense index beside sparse shards names dense ones
            shards = {s.removesuffix(".safetensors") + ".sparse.safetensors" for s in shards}
        found |= shards & names
    config = _read_json_object(folder / "config.json") or {}
    entry = config.get("sparsity_config")
    if isinstance(entry, dict):
        found |= set(_names(entry.get("sparse_files"))) & names
    return found


def own_files(folder: Path) -> set[str]:
    """Top-level names in ``folder`` that this package wrote (its manifest, or for a folder saved
    before manifests existed, the package's exact file names and weights beside its ``pruning_report.json``)."""
    names = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    listed = read_manifest(folder)
    if listed is not None:
        return (set(listed) & names) | ({MANIFEST_NAME} & names)
    if _LEGACY_MARKER in names and _is_model_config(folder / "config.json"):
        return (names & set(OWN_NAMES)) | weight_files(folder)
    return set()


def _is_plain_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and not own_files(folder) and _is_model_config(folder / "config.json")


def stale_files(folder: Path) -> set[str]:
    """Names in ``folder`` a save drops when it does not write them again: the package's own files, and in a
    plain transformers checkpoint its weights (the old index and the shards it names), which would otherwise
    shadow the new ones (transformers reads ``model.safetensors`` before any index)."""
    if _is_plain_checkpoint(folder):
        return weight_files(folder)
    return own_files(folder)


def replaceable_files(folder: Path) -> set[str]:
    """Names in ``folder`` a save may replace without asking: :func:`stale_files`, the transformers model and
    tokenizer files of a plain transformers checkpoint (as ``save_pretrained`` itself replaces them), and
    those files a save kept from such a checkpoint (listed in its manifest)."""
    names = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    if _is_plain_checkpoint(folder):
        return weight_files(folder) | (names & set(_MODEL_NAMES))
    data = _manifest(folder)
    kept = set(_names(data.get("model_files"))) if data is not None else set()
    return own_files(folder) | (kept & names & set(_MODEL_NAMES))


def check_replaceable(target: str | os.PathLike, overwrite: bool = False, writes: Iterable[str] = ()) -> Path:
    """Validate ``target`` as a save destination; return its absolute real path.

    Fine: a missing path, an empty folder, a folder holding a model checkpoint (its other files are kept).
    A folder with files but no model config (``config.json`` with a ``model_type``) is refused unless
    ``overwrite``, and so is any of the names in ``writes`` that exists there and was not written by the
    package (in a plain transformers checkpoint: anything but its model and tokenizer files).
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
            "choose a new or empty folder, or pass overwrite=True to save the model beside those files "
            "(only files with the saved model's own names are replaced)"
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
    return sorted(
        p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()
    )


def _our_staging_folders(target: Path) -> list[tuple[Path, dict]]:
    """Staging folders of this package's saves to ``target``: their manifest names the folder itself; or,
    killed between creating one and writing its manifest, one with the package's random name that holds
    nothing but a temporary copy of that manifest (often nothing at all)."""
    found = []
    fresh = re.compile(rf"\.{re.escape(target.name)}{re.escape(_TMP)}[0-9a-f]{{12}}")
    for folder in _siblings(target, _TMP):
        data = _manifest(folder)
        if data is not None and data.get("staging") == folder.name:
            found.append((folder, data))
        elif (
            data is None
            and fresh.fullmatch(folder.name)
            and all(
                (match := _TEMP_FILE.match(entry.name)) and match.group(1) == MANIFEST_NAME
                for entry in folder.iterdir()
            )
        ):
            found.append((folder, {}))
    return found


def _same_entry(first: Path, second: Path) -> bool:
    try:
        a, b = os.lstat(first), os.lstat(second)
    except OSError:
        return False
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _carry_over(old: Path, new: Path, skip: set[str] = frozenset()) -> None:
    """Move into ``new`` every entry of ``old`` (the folder a save replaced) that a user added or replaced
    while the save ran: an entry ``new`` lacks, or a file that is no longer the one linked into ``new``
    (rewritten by write-then-rename). Sub-folders are compared the same way; ``skip`` names the package's
    own entries (never carried)."""
    for entry in list(old.iterdir()):
        if entry.name in skip:
            continue
        counterpart = new / entry.name
        if not os.path.lexists(counterpart):
            os.replace(entry, counterpart)
        elif (
            entry.is_dir()
            and not entry.is_symlink()
            and counterpart.is_dir()
            and not counterpart.is_symlink()
        ):
            _carry_over(entry, counterpart)
        elif not _same_entry(entry, counterpart) and not entry.is_dir():
            if counterpart.is_dir() and not counterpart.is_symlink():
                continue  # a folder replaced by a file during the save: keep the folder, nothing is lost
            os.replace(entry, counterpart)


def _rescue_foreign(old: Path, target: Path) -> None:
    """:func:`_carry_over` from a swapped-out folder into ``target``, skipping the package's files."""
    skip = stale_files(old) | own_files(target) | {MANIFEST_NAME}
    _carry_over(old, target, skip)


def recover(target: Path) -> None:
    """Finish what an interrupted save left: put the previous folder back if the target is missing, move
    user files out of an old copy, delete this package's stale staging folders and temporary files.

    Only siblings the package made are touched: a staging folder whose manifest names the folder itself, and
    an old copy whose name the manifest of the target (or of such a staging folder) records. A user's
    ``.<name>.tmp-mine/`` or ``.<name>.old-backup/`` is never moved, renamed or deleted.
    """
    staging = _our_staging_folders(target)
    olds = {p.name: p for p in _siblings(target, _OLD)}
    if not os.path.lexists(target):
        # Killed between the two renames of a save without atomic exchange: its staging folder names the
        # old copy it moved aside.
        for _folder, data in staging:
            previous = olds.get(str(data.get("previous")))
            if previous is not None:
                logger.warning(
                    "recovering %s from %s (an earlier save was interrupted)", target, previous.name
                )
                os.replace(previous, target)
                del olds[previous.name]
                break
    recorded = _manifest(target) if target.is_dir() else None
    if recorded is not None:
        previous = olds.get(str(recorded.get("previous")))
        if previous is not None:  # killed after the second rename: the old copy is ours to tidy up
            _rescue_foreign(previous, target)
            shutil.rmtree(previous)
        name = str(recorded.get("staging", ""))
        swapped_out = target.parent / name
        if (
            name.startswith(f".{target.name}{_TMP}")
            and Path(name).name == name
            and swapped_out.is_dir()
            and not swapped_out.is_symlink()
            and not _manifest_names(swapped_out, swapped_out.name)
        ):
            # Killed right after the exchange: this staging name now holds the previous folder.
            _rescue_foreign(swapped_out, target)
            shutil.rmtree(swapped_out)
    for folder, _data in staging:
        if folder.exists():
            shutil.rmtree(folder)
    if target.is_dir():
        for entry in target.iterdir():  # temporary files of an interrupted write_file
            match = _TEMP_FILE.match(entry.name)
            if match and match.group(1) in (*OWN_NAMES, MANIFEST_NAME) and entry.is_file():
                entry.unlink()


def _manifest_names(folder: Path, name: str) -> bool:
    """Whether ``folder`` is itself a staging folder (its manifest records ``name`` as its staging name)."""
    data = _manifest(folder)
    return data is not None and data.get("staging") == name


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


def _swap_in(staging: Path, target: Path, old: Path, durable: bool) -> Path | None:
    """Make the complete ``staging`` folder the ``target``: the commit point of a save. Returns where the
    previous folder now is (``None``: there was none)."""
    if not os.path.lexists(target):
        os.replace(staging, target)
        swapped_out = None
    else:
        try:
            exchange_paths(staging, target)
            swapped_out = staging  # now holds the previous folder
        except OSError as err:
            if err.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # No atomic exchange here: a kill between these two renames leaves only `old`, which the next
            # save (recover) renames back, as the staging folder's manifest names it.
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)
                raise
            swapped_out = old
    if durable:
        fsync_directory(target.parent)
    return swapped_out


def _tidy_up(swapped_out: Path, target: Path) -> None:
    """After the commit: carry across what a user added or replaced during the save, drop the old folder.
    A failure here is left for the next save's :func:`recover`."""
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


def _manifest_bytes(staging: Path, files: list[str], previous: str, model_files: list[str] = ()) -> str:
    data: dict = {"files": files, "writer": _WRITER, "staging": staging.name, "previous": previous}
    if model_files:
        data["model_files"] = list(model_files)
    return json.dumps(data, indent=2) + "\n"


@contextmanager
def save_transaction(
    target: str | os.PathLike, *, overwrite: bool = False, keep_own: bool = False, durable: bool = True
) -> Iterator[Path]:
    """Yield an empty staging folder; the files written there replace the package's files in ``target``.

    On success the folder at ``target`` becomes: the staged files, every entry a save may not drop (kept
    as it was), and with ``keep_own`` also the package's old files that were not restaged (a card rewrite
    keeps the weights); without it the package's old files are dropped (stale shards). On any exception
    ``target`` is untouched and the staging folder is removed. The folder's lock is held throughout
    (:class:`FolderInUseError` when another save or run holds it). With ``durable``, every new file and
    folder is fsynced before the swap and the parent folder after it: once this returns, the new folder
    survives a power loss too.
    """
    path = check_replaceable(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(path, "a save"):
        recover(path)
        token = uuid.uuid4().hex[:12]
        # os.mkdir (not tempfile.mkdtemp, which forces mode 0o700) so the final folder gets the usual umask mode.
        staging = path.with_name(f".{path.name}{_TMP}{token}")
        old = path.with_name(f".{path.name}{_OLD}{token}")
        os.mkdir(staging)
        try:
            # First, so that an interrupted save's staging folder is recognised (and only ours is cleaned).
            write_file(staging / MANIFEST_NAME, _manifest_bytes(staging, [], old.name), durable=False)
            yield staging
            written = sorted(entry.name for entry in staging.iterdir() if entry.name != MANIFEST_NAME)
            check_replaceable(path, overwrite, writes=written)
            _normalize_modes(staging, written)
            kept_own: list[str] = []
            model_files: list[str] = []
            if path.is_dir():
                own = own_files(path)
                stale = stale_files(path)
                replaceable = replaceable_files(path)
                for entry in path.iterdir():
                    name = entry.name
                    if name in written or name == MANIFEST_NAME:
                        continue
                    if name in stale and not (keep_own and name in own):
                        continue  # the package's stale file (an old shard, a card no longer written)
                    _link_tree(entry, staging / name)
                    if name in own:
                        kept_own.append(name)
                    elif name in replaceable:
                        # a plain transformers folder's tokenizer file: a later save may replace it
                        model_files.append(name)
                _copy_mode_and_owner(path, staging)
            files = sorted({*written, *kept_own})
            write_file(
                staging / MANIFEST_NAME,
                _manifest_bytes(staging, files, old.name, sorted(model_files)),
                durable=False,
            )
            if durable:
                fsync_tree(staging)
            swapped_out = _swap_in(staging, path, old, durable)
        except BaseException:
            committed = _manifest_names(path, staging.name)
            # Between the two renames (no atomic exchange) the staging manifest is what names the old copy.
            half_renamed = not os.path.lexists(path) and os.path.lexists(old)
            if not committed and not half_renamed:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if swapped_out is not None:
            _tidy_up(swapped_out, path)


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


#: the former name of :func:`save_transaction`
checkpoint_transaction = save_transaction
