"""Nothing lost, nothing silently wrong: what a save may replace, which siblings it may touch, files written
during a save, folder locks, integrity records that cannot be switched off, spilled activations of killed
runs, a tampered resume state, and the one-home-per-mechanism structure (one writer, no import cycle)."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import fault_injection as fi
import pytest
import torch
from hub_fixtures import make_report, prune_by_magnitude, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

import optimum_mwanda.hub.atomic as atomic
from optimum_mwanda import files, load_pruned_model
from optimum_mwanda.hub import save_pruned_model
from optimum_mwanda.hub.atomic import MANIFEST_NAME
from optimum_mwanda.modeling import ActivationStore
from optimum_mwanda.modeling.activations import OWNER_FILE, SPILL_PREFIX, remove_stale_spill_folders
from optimum_mwanda.resume import CheckpointCorruptError, _state_bytes

PACKAGE = Path(__file__).resolve().parents[1] / "optimum_mwanda"


@pytest.fixture(scope="module")
def pruned():
    model = tiny_llama(seed=3)
    prune_by_magnitude(model, 0.5)
    return model, make_report(model, ["en", "sw"])


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- 1. a plain transformers folder: exactly what the save writes -------------------------------------------
def test_saving_into_a_plain_transformers_folder_replaces_exactly_what_it_writes(pruned, tmp_path):
    model, report = pruned
    plain = tmp_path / "plain"
    tiny_llama(seed=9).save_pretrained(plain, max_shard_size="40KB")  # sharded: an index and its shards
    old_shards = json.loads((plain / "model.safetensors.index.json").read_text())["weight_map"].values()
    assert len(set(old_shards)) > 1
    mine = {
        "model.fp16.safetensors": b"my half-precision copy",
        "tokenizer_backup.json": b'{"mine": true}',
        "model-notes.safetensors": b"not a shard of the index",
    }
    for name, data in mine.items():
        (plain / name).write_bytes(data)

    save_pruned_model(model, plain, report, tokenizer=tiny_tokenizer(), model_card=False)
    for name, data in mine.items():
        assert (plain / name).read_bytes() == data, name
    names = {p.name for p in plain.iterdir()}
    assert not set(old_shards) & names, "the stale shards the old index names are removed"
    loaded = load_pruned_model(plain)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    # The user's files stay the user's: not listed as written by the package.
    assert not set(mine) & set(json.loads((plain / MANIFEST_NAME).read_text())["files"])
    save_pruned_model(model, plain, report, tokenizer=tiny_tokenizer(), model_card=False)  # again: fine
    assert all((plain / name).read_bytes() == data for name, data in mine.items())


def test_a_plain_folder_keeps_the_tokenizer_a_save_does_not_write(pruned, tmp_path):
    model, report = pruned
    plain = tmp_path / "plain"
    tiny_llama(seed=9).save_pretrained(plain)
    tiny_tokenizer().save_pretrained(plain)
    tokenizer_files = {p.name: p.read_bytes() for p in plain.glob("tokenizer*")}
    save_pruned_model(model, plain, report, model_card=False)  # no tokenizer given: its files are kept
    assert {p.name: p.read_bytes() for p in plain.glob("tokenizer*")} == tokenizer_files
    save_pruned_model(model, plain, report, tokenizer=tiny_tokenizer(), model_card=False)  # replaceable


# -- 2. sibling folders: only the package's own ---------------------------------------------------------------
def test_user_folders_named_like_staging_siblings_are_never_touched(pruned, tmp_path):
    model, report = pruned
    out = tmp_path / "out"
    user = {
        ".out.tmp-mine": {"a.txt": b"mine"},
        ".out.old-backup": {"b.txt": b"my backup"},
        ".out.tmp-0123456789ab": {"c.txt": b"random-looking, still mine"},
    }
    for folder, content in user.items():
        (tmp_path / folder).mkdir()
        for name, data in content.items():
            (tmp_path / folder / name).write_bytes(data)
    save_pruned_model(model, out, report, model_card=False)
    save_pruned_model(model, out, report, model_card=False)  # over an existing checkpoint
    for folder, content in user.items():
        assert _tree(tmp_path / folder) == content, folder
    assert "b.txt" not in {p.name for p in out.iterdir()}

    # No `out` at all: a user's `.out.old-xyz/` is not taken for an interrupted save's old copy.
    other = tmp_path / "other"
    (tmp_path / ".other.old-xyz").mkdir()
    (tmp_path / ".other.old-xyz" / "config.json").write_text('{"model_type": "llama"}')
    save_pruned_model(model, other, report, model_card=False)
    assert _tree(tmp_path / ".other.old-xyz") == {"config.json": b'{"model_type": "llama"}'}
    assert load_pruned_model(other) is not None


def test_an_interrupted_saves_own_staging_folder_is_still_cleaned(pruned, tmp_path, monkeypatch):
    model, report = pruned
    out = tmp_path / "out"
    save_pruned_model(model, out, report, model_card=False)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # like a kill: the except clause's own clean-up is skipped below

    with monkeypatch.context() as patch:
        patch.setattr(atomic, "exchange_paths", killed)
        patch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt):
            save_pruned_model(model, out, report, model_card=False)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1
    save_pruned_model(model, out, report, model_card=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# -- 3. files written during a save; locks ------------------------------------------------------------------
def test_files_written_into_the_folder_during_a_save_are_kept(pruned, tmp_path, monkeypatch):
    model, report = pruned
    out = tmp_path / "out"
    save_pruned_model(model, out, report, model_card=False)
    (out / "eval").mkdir()
    (out / "eval" / "old.txt").write_text("old\n")
    (out / "trainer_state.json").write_text('{"step": 1}')
    real_exchange = atomic.exchange_paths

    def another_process_writes(first, second):
        # After the save linked the folder's entries, before its swap: a new file in a sub-folder and a
        # write-then-rename of an existing file.
        (out / "eval" / "new.txt").write_text("new\n")
        (out / "trainer_state.json.tmp").write_text('{"step": 2}')
        os.replace(out / "trainer_state.json.tmp", out / "trainer_state.json")
        (out / "added.txt").write_text("added\n")
        return real_exchange(first, second)

    monkeypatch.setattr(atomic, "exchange_paths", another_process_writes)
    save_pruned_model(model, out, report, model_card=False)
    assert (out / "eval" / "new.txt").read_text() == "new\n"
    assert (out / "eval" / "old.txt").read_text() == "old\n"
    assert (out / "trainer_state.json").read_text() == '{"step": 2}'
    assert (out / "added.txt").read_text() == "added\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]


def test_two_saves_to_one_folder_the_second_gets_in_use(pruned, tmp_path):
    model, report = pruned
    out = tmp_path / "out"
    save_pruned_model(model, out, report, model_card=False)
    before = _tree(out)
    with files.folder_lock(out, "a test"):
        with pytest.raises(files.FolderInUseError, match=rf"in use by process {os.getpid()}"):
            save_pruned_model(model, out, report, model_card=False)
    assert _tree(out) == before
    save_pruned_model(model, out, report, model_card=False)  # the lock is free again


_HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from optimum_mwanda.files import folder_lock
    with folder_lock(sys.argv[1], "a holder"):
        print("locked", flush=True)
        time.sleep(600)
    """
)


def test_a_lock_held_by_another_process_refuses_and_a_killed_owners_lock_is_taken_over(pruned, tmp_path):
    model, report = pruned
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(files.FolderInUseError, match=rf"process {holder.pid}"):
            save_pruned_model(model, out, report, model_card=False)
        with pytest.raises(files.FolderInUseError, match="in use"):
            fi.prune("wanda", out)  # a run with this checkpoint_dir: the same lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert files.lock_path_for(out).exists()  # the killed owner's lock file is left behind...
    save_pruned_model(model, out, report, model_card=False)  # ...and taken over
    assert not files.lock_path_for(out).exists()


def test_two_runs_on_one_checkpoint_dir(tmp_path):
    checkpoint_dir = tmp_path / "checkpoint"
    with files.folder_lock(checkpoint_dir, "a test"):
        with pytest.raises(files.FolderInUseError, match="in use"):
            fi.prune("wanda", checkpoint_dir)
    fi.prune("wanda", checkpoint_dir)
    assert not files.lock_path_for(checkpoint_dir).exists()


# -- 8. integrity records that cannot be switched off --------------------------------------------------------
def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_renamed_checksum_record_does_not_switch_the_check_off(pruned, tmp_path):
    model, report = pruned
    out = save_pruned_model(model, tmp_path / "packed", report, compressed=True, model_card=False)
    config = json.loads((out / "config.json").read_text())
    entry = config["sparsity_config"]
    entry["sparse_files_sha256_disabled"] = entry.pop("sparse_files_sha256")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no SHA-256"):
        load_pruned_model(out)  # refused even before any byte is changed
    _flip_middle(out / entry["sparse_files"][0])
    with pytest.raises(ValueError, match="no SHA-256"):
        load_pruned_model(out)


def _drop_layer_and_rehash(folder: Path, layer: int) -> None:
    """Remove one decoder layer's tensors from a compressed folder and recompute everything that would
    give it away (the file's layout metadata and config.json's digests)."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    entry = config["sparsity_config"]
    for name in entry["sparse_files"]:
        path = folder / name
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(str(path))
        prefix = f"model.layers.{layer}."
        layout = {k: v for k, v in json.loads(metadata["tensors"]).items() if not k.startswith(prefix)}
        kept = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
        save_file(kept, str(path), metadata={**metadata, "tensors": json.dumps(layout, sort_keys=True)})
        entry["sparse_files_sha256"][name] = files.file_sha256(path)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_folder_whose_tensors_do_not_cover_the_model_is_refused(pruned, tmp_path):
    model, report = pruned
    packed = save_pruned_model(model, tmp_path / "packed", report, compressed=True, model_card=False)
    _drop_layer_and_rehash(packed, 1)
    with pytest.raises(ValueError, match=r"missing from the files .*model\.layers\.1\."):
        load_pruned_model(packed)

    dense = save_pruned_model(model, tmp_path / "dense", report, model_card=False)
    tensors = load_file(str(dense / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if ".layers.0.mlp." not in k}
    tensors["extra.weight"] = torch.zeros(3)
    save_file(tensors, str(dense / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing from the files .*not in the model \(extra\.weight\)"):
        load_pruned_model(dense)
    # A complete folder still loads, and output_loading_info is passed through.
    again = save_pruned_model(model, tmp_path / "dense2", report, model_card=False)
    loaded, info = load_pruned_model(again, output_loading_info=True)
    assert info["missing_keys"] == [] or not info["missing_keys"]


# -- 10. spilled activations of killed runs ---------------------------------------------------------------
def test_spill_folders_of_dead_processes_are_cleaned_and_nothing_else(tmp_path):
    child = os.fork()
    if child == 0:  # a run that spills, then is killed
        try:
            store = ActivationStore([torch.ones(4)], max_memory_bytes=0, spill_dir=tmp_path)
            assert store.batches_on_disk == 1
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(child, 0)
    left = list(tmp_path.glob(SPILL_PREFIX + "*"))
    assert len(left) == 1 and json.loads((left[0] / OWNER_FILE).read_text())["pid"] == child
    unowned = tmp_path / f"{SPILL_PREFIX}mine"  # the prefix, but no owner file: not ours
    unowned.mkdir()
    (unowned / "data.pt").write_bytes(b"mine")
    live = tmp_path / f"{SPILL_PREFIX}live"  # a running process's
    live.mkdir()
    (live / OWNER_FILE).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename}))

    store = ActivationStore([torch.ones(4), torch.zeros(4)], max_memory_bytes=16, spill_dir=tmp_path)
    assert store.batches_on_disk == 1 and torch.equal(store[1], torch.zeros(4))
    names = {p.name for p in tmp_path.iterdir()}
    assert left[0].name not in names, "the killed run's spill folder is removed"
    assert {unowned.name, live.name} <= names and (unowned / "data.pt").read_bytes() == b"mine"
    store.close()
    assert {p.name for p in tmp_path.iterdir()} == {unowned.name, live.name}
    assert remove_stale_spill_folders(tmp_path) == []


# -- 13. a tampered, re-hashed state.json touches no file --------------------------------------------------
def _partial_checkpoint(folder: Path) -> None:
    with fi.io_steps(fi.raise_before("open", ".tmp-layer_2.safetensors")), pytest.raises(fi.InjectedFault):
        fi.prune("wanda", folder)


@pytest.mark.parametrize(
    "tamper",
    [
        {"completed_layers": 99, "layers": ["0"]},
        {"completed_layers": -1, "layers": []},
        {"completed_layers": 2, "layers": ["0", "1"], "hidden": None},
        {"completed_layers": 2, "layers": ["0", "1"], "layer_sparsity": [0.5, 0.5]},
        {"completed_layers": 2, "layers": ["1", "0"], "swap": True},
    ],
    ids=["beyond-the-model", "negative", "no-hidden-states", "short-schedule", "swapped-layer-files"],
)
def test_a_tampered_rehashed_state_is_refused_before_any_file_is_touched(tmp_path, tamper):
    folder = tmp_path / "checkpoint"
    _partial_checkpoint(folder)
    document = json.loads((folder / "state.json").read_text())
    document.pop("sha256")
    document["state"]["completed_layers"] = tamper["completed_layers"]
    if "layer_sparsity" in tamper:
        document["state"]["layer_sparsity"] = tamper["layer_sparsity"]
    names = {i: document["layers"][i] for i in document["layers"]}
    if tamper.get("swap"):
        document["layers"] = {"0": names["1"], "1": names["0"]}
    else:
        document["layers"] = {i: names[i] for i in tamper["layers"]}
    if "hidden" in tamper:
        document["hidden"] = None
    kept = set(document["layers"].values()) | ({document["hidden"]} - {None})
    document["files"] = {k: v for k, v in document["files"].items() if k in kept}
    (folder / "state.json").write_bytes(_state_bytes(document))  # a valid checksum
    before = _tree(folder)
    with pytest.raises(CheckpointCorruptError, match="inconsistent|does not hold"):
        fi.prune("wanda", folder)
    assert _tree(folder) == before


# -- one home per mechanism ------------------------------------------------------------------------------
def _imports(path: Path) -> list[tuple[str, bool, bool]]:
    """(module, inside a function, inside an ``if TYPE_CHECKING``) of every import in ``path``."""
    found = []

    def visit(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            function = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            checking = in_type_checking or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.ImportFrom):
                module = "." * child.level + (child.module or "")
                found.extend(
                    (f"{module}.{a.name}" if not child.module else module, function, checking)
                    for a in child.names
                )
            elif isinstance(child, ast.Import):
                found.extend((a.name, function, checking) for a in child.names)
            visit(child, function, checking)

    visit(ast.parse(path.read_text()), False, False)
    return found


def test_modeling_never_imports_the_resume_checkpoint():
    for path in sorted((PACKAGE / "modeling").glob("*.py")):
        for module, in_function, in_type_checking in _imports(path):
            assert "resume" not in module, (path.name, module, in_function, in_type_checking)


def test_the_lowest_layers_import_nothing_of_the_package():
    for name in ("distributed.py", "files.py"):
        modules = [module for module, _, _ in _imports(PACKAGE / name)]
        assert not [m for m in modules if m.startswith(".") or m.startswith("optimum_mwanda")], (
            name,
            modules,
        )
    source = (PACKAGE / "distributed.py").read_text()
    assert "collector: Any" not in source and "statistics: Sequence[Any]" not in source


def test_one_atomic_writer():
    """Every module that writes a file's bytes goes through files.write_file (or a transaction's staging
    folder, which transformers' save_pretrained fills): no other open-for-writing in the package."""
    writers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "files.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "open",
                "os.open",
                "Path.write_bytes",
            ):
                mode = ast.unparse(node.args[1]) if len(node.args) > 1 else ""
                if any(flag in mode for flag in "wax+") or "O_WRONLY" in mode or "O_CREAT" in mode:
                    writers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr in ("write_text", "write_bytes"):
                writers.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert writers == [], writers


def test_durable_writes_fsync_and_plain_ones_do_not(tmp_path, monkeypatch):
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    files.write_file(tmp_path / "a", b"x", durable=False)
    assert synced == []
    files.write_file(tmp_path / "b", b"y")  # durable by default: the file, then its folder
    assert len(synced) == 2
    assert (tmp_path / "a").read_bytes() == b"x" and (tmp_path / "b").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_durable_save_fsyncs_every_file_it_swaps_in(pruned, tmp_path, monkeypatch):
    model, report = pruned
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = save_pruned_model(model, tmp_path / "out", report, model_card=False)
    saved = {p.name for p in out.iterdir()}
    assert saved <= {Path(p).name for p in synced}, saved - {Path(p).name for p in synced}
    synced.clear()
    save_pruned_model(model, tmp_path / "fast", report, model_card=False, durable=False)
    assert synced == []
