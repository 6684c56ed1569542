"""Saving never deletes what is not ours, and is crash-consistent: fault injection at every write and rename.

The sweep raises (in-process) at every file write, rename, link and removal that a dense and a compressed
save over an existing checkpoint perform, in two modes: "once" (only that operation fails; the clean-up code
runs) and "dead" (that and every later operation fail, like a process killed at that instant). After each
fault the user's files must be intact, the folder must hold exactly the old or exactly the new checkpoint,
and the next save must succeed and leave no leftovers. A few real SIGKILLs of a subprocess complete it.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_fixtures import OFFLOAD_LAYER_1, make_report, prune_by_magnitude, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

import optimum_mwanda.hub.atomic as atomic
from optimum_mwanda import load_pruned_model
from optimum_mwanda.hub import CheckpointConflictError, save_pruned_model
from optimum_mwanda.hub.atomic import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]


class InjectedFault(OSError):
    def __init__(self, what: str):
        super().__init__(errno.EIO, f"injected fault at {what}")


class FaultInjector:
    """Counts (and fails) every write/rename/link/removal primitive, wherever it is called from."""

    def __init__(self, monkeypatch, fail_at: int | None = None, dead: bool = False):
        self.count = 0
        self.fail_at = fail_at
        self.dead = dead
        self.events: list[str] = []
        self._patch(monkeypatch)

    def _tick(self, what: str) -> None:
        self.count += 1
        self.events.append(what)
        if self.fail_at is not None and (
            self.count == self.fail_at or (self.dead and self.count > self.fail_at)
        ):
            raise InjectedFault(what)

    def _patch(self, monkeypatch) -> None:
        import safetensors.torch
        import transformers.modeling_utils

        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            if any(flag in mode for flag in "wax+"):
                self._tick(f"open({Path(str(file)).name}, {mode})")
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

        def wrap(module, name):
            real = getattr(module, name)

            def wrapper(*args, **kwargs):
                self._tick(f"{name}({', '.join(Path(str(a)).name for a in args[:2])})")
                return real(*args, **kwargs)

            monkeypatch.setattr(module, name, wrapper)

        for name in ("replace", "rename", "link", "symlink", "mkdir", "unlink", "remove", "rmdir"):
            wrap(os, name)
        wrap(shutil, "rmtree")
        wrap(atomic, "exchange_paths")
        real_save_file = safetensors.torch.save_file

        def save_file(tensors, filename, *args, **kwargs):
            self._tick(f"save_file({Path(str(filename)).name})")
            return real_save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
        import optimum_mwanda.hub.compression as compression

        monkeypatch.setattr(compression, "save_file", save_file)


def _digest(path: Path) -> str:
    """SHA-256 of a file's content; for safetensors of its metadata and tensors (safetensors writes its
    metadata map in no fixed order, so equal checkpoints can differ in bytes), and for config.json without
    the checksums of those files."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        digest = hashlib.sha256()
        with safe_open(str(path), framework="pt") as handle:
            digest.update(json.dumps(handle.metadata(), sort_keys=True).encode())
            for name in sorted(handle.keys()):
                digest.update(name.encode() + handle.get_tensor(name).numpy().tobytes())
        return digest.hexdigest()
    data = path.read_bytes()
    if path.name == "config.json":
        config = json.loads(data)
        config.get("sparsity_config", {}).pop("sparse_files_sha256", None)
        data = json.dumps(config, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> content digest of every file below ``folder``."""
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _without_manifest(snapshot: dict[str, str]) -> dict[str, str]:
    return {name: digest for name, digest in snapshot.items() if name != MANIFEST_NAME}


def _user_files(folder: Path) -> None:
    (folder / "src").mkdir()
    (folder / "src" / "train.py").write_text("print('mine')\n")
    (folder / "eval").mkdir()
    (folder / "eval" / "scores.csv").write_text("en,12.3\n")
    (folder / "NOTES.txt").write_text("do not lose me\n")


USER = {"src/train.py", "eval/scores.csv", "NOTES.txt"}


@pytest.fixture(scope="module")
def two_models():
    old = tiny_llama(seed=1)
    prune_by_magnitude(old, 0.5)
    new = tiny_llama(seed=2)
    prune_by_magnitude(new, 0.6)
    return (old, make_report(old, ["en", "sw"])), (new, make_report(new, ["en", "de"]))


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


# -- what is ours -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True])
def test_resave_keeps_user_files_and_drops_only_our_stale_files(two_models, tmp_path, compressed):
    (old, old_report), (new, new_report) = two_models
    target = tmp_path / "ckpt"
    save_pruned_model(old, target, old_report, tokenizer=tiny_tokenizer(), max_shard_size="40KB")
    assert len(list(target.glob("model-*.safetensors"))) > 1  # sharded
    _user_files(target)
    user = {name: digest for name, digest in _snapshot(target).items() if name in USER}

    save_pruned_model(new, target, new_report, compressed=compressed, model_card=False)
    names = {p.name for p in target.iterdir()}
    assert {name: digest for name, digest in _snapshot(target).items() if name in USER} == user
    assert not list(target.glob("model-*-of-*.safetensors")), "stale shards of the old save are removed"
    assert "README.md" not in names and "tokenizer.json" not in names  # ours, not written this time
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == names - USER - {"src", "eval", MANIFEST_NAME}
    assert _siblings(target) == []
    loaded = load_pruned_model(target)
    for name, tensor in new.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_a_project_folder_that_is_no_checkpoint_is_refused_unless_overwrite(two_models, tmp_path):
    (old, report), _ = two_models
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"learning_rate": 0.1}\n')  # not a model config
    (project / "src").mkdir()
    (project / "src" / "main.py").write_text("x = 1\n")
    with pytest.raises(CheckpointConflictError, match="no saved model .* overwrite=True"):
        save_pruned_model(old, project, report)
    assert (project / "config.json").read_text() == '{"learning_rate": 0.1}\n'
    save_pruned_model(old, project, report, overwrite=True)
    assert (project / "src" / "main.py").read_text() == "x = 1\n"  # kept even with overwrite
    assert AutoModelForCausalLM.from_pretrained(project) is not None


def test_a_user_readme_in_a_plain_transformers_checkpoint_is_not_replaced(two_models, tmp_path):
    (old, report), _ = two_models
    plain = tmp_path / "plain"
    old.save_pretrained(plain)
    (plain / "README.md").write_text("my own card\n")
    with pytest.raises(CheckpointConflictError, match="README.md, not written by optimum-mwanda"):
        save_pruned_model(old, plain, report)
    assert (plain / "README.md").read_text() == "my own card\n"
    save_pruned_model(old, plain, report, model_card=False)  # the model files are replaceable
    assert (plain / "README.md").read_text() == "my own card\n"
    save_pruned_model(old, plain, report, overwrite=True)
    assert (plain / "README.md").read_text().startswith("---")


def test_saving_into_the_folder_the_model_was_loaded_from(two_models, tmp_path):
    (old, report), _ = two_models
    target = save_pruned_model(old, tmp_path / "ckpt", report)
    loaded = AutoModelForCausalLM.from_pretrained(target)  # name_or_path is that folder
    with torch.no_grad():
        loaded.model.layers[0].mlp.up_proj.weight.mul_(2)
    expected = {k: v.clone() for k, v in loaded.state_dict().items()}
    save_pruned_model(loaded, target, report)  # written elsewhere, swapped in when complete
    ids = torch.tensor([[1, 2, 3]])
    loaded(ids)  # the in-memory model still works
    again = AutoModelForCausalLM.from_pretrained(target)
    for name, tensor in expected.items():
        assert torch.equal(tensor, again.state_dict()[name]), name


def test_an_offloaded_model_cannot_be_saved_over_its_weight_source(two_models, tmp_path):
    (old, report), _ = two_models
    source = save_pruned_model(old, tmp_path / "ckpt", report)
    offload = tmp_path / "offload"
    model = AutoModelForCausalLM.from_pretrained(
        source, device_map=OFFLOAD_LAYER_1, offload_folder=str(offload)
    )
    before = _snapshot(source)
    with pytest.raises(ValueError, match="still reads its weights from"):
        save_pruned_model(model, source, report)
    assert _snapshot(source) == before
    with pytest.raises(ValueError, match="still reads its weights from"):
        save_pruned_model(model, tmp_path, report, overwrite=True)  # holds the offload folder


def test_saved_files_get_the_usual_mode(two_models, tmp_path):
    (old, report), _ = two_models
    umask = os.umask(0o022)
    try:
        target = save_pruned_model(old, tmp_path / "ckpt", report, tokenizer=tiny_tokenizer())
        target2 = save_pruned_model(old, tmp_path / "ckpt2", report, compressed=True)
    finally:
        os.umask(umask)
    for folder in (target, target2):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()}
        assert set(modes.values()) == {"0o644"}, modes


# -- crash consistency ------------------------------------------------------------------------------------
def _save(model, report, target, compressed):
    return save_pruned_model(
        model, target, report, tokenizer=tiny_tokenizer(), compressed=compressed, eval_results=None
    )


@pytest.mark.parametrize(
    "dead", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fault-once", "dead-after-fault"]
)
@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
def test_fault_at_every_write_and_rename_leaves_old_or_new_and_the_next_save_cleans_up(
    two_models, tmp_path, monkeypatch, compressed, dead
):
    (old, old_report), (new, new_report) = two_models
    base = tmp_path / "base"
    _save(old, old_report, base / "ckpt", compressed)
    _user_files(base / "ckpt")
    old_state = _snapshot(base / "ckpt")
    scratch = tmp_path / "scratch"
    shutil.copytree(base, scratch)
    _save(new, new_report, scratch / "ckpt", compressed)
    new_ours = {k: v for k, v in _snapshot(scratch / "ckpt").items() if k not in USER and k != MANIFEST_NAME}
    old_ours = {k: v for k, v in old_state.items() if k not in USER and k != MANIFEST_NAME}
    user = {k: v for k, v in old_state.items() if k in USER}

    shutil.copytree(base, tmp_path / "count")
    with monkeypatch.context() as patch:
        counter = FaultInjector(patch)
        _save(new, new_report, tmp_path / "count" / "ckpt", compressed)
    points = counter.count
    assert points > 20, counter.events

    outcomes = {"old": 0, "new": 0}
    for k in range(1, points + 1):
        run = tmp_path / f"run-{k}"
        shutil.copytree(base, run)
        target = run / "ckpt"
        with monkeypatch.context() as patch:
            injector = FaultInjector(patch, fail_at=k, dead=dead)
            try:
                _save(new, new_report, target, compressed)
            except (OSError, RuntimeError):
                pass
        if len(injector.events) < k:  # the counting run did one-time work (caches) this one skips
            break
        where = injector.events[k - 1]
        state = _snapshot(target)  # the target is never missing
        assert {n: d for n, d in state.items() if n in USER} == user, where
        ours = {n: d for n, d in state.items() if n not in USER and n != MANIFEST_NAME}
        assert ours in (old_ours, new_ours), f"a mix after a fault at {where}"
        outcomes["old" if ours == old_ours else "new"] += 1
        # The next save succeeds and leaves no leftovers.
        _save(new, new_report, target, compressed)
        assert _without_manifest(_snapshot(target)) == _without_manifest(_snapshot(scratch / "ckpt")), where
        assert _siblings(target) == [], where
        assert not [p for p in target.iterdir() if ".tmp-" in p.name], where
        shutil.rmtree(run)
    assert sum(outcomes.values()) == points, (outcomes, points)
    # Faults before the commit point keep the old checkpoint; after it, the new one is complete.
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
    print(
        f"{'compressed' if compressed else 'dense'} dead={dead}: {sum(outcomes.values())} fault points -> {outcomes}"
    )


def test_a_kill_between_two_renames_is_recovered_where_there_is_no_atomic_exchange(
    two_models, tmp_path, monkeypatch
):
    (old, old_report), (new, new_report) = two_models
    target = tmp_path / "ckpt"
    _save(old, old_report, target, False)
    _user_files(target)
    before = _snapshot(target)

    def no_exchange(first, second):
        raise OSError(errno.EINVAL, "not supported here")

    monkeypatch.setattr(atomic, "exchange_paths", no_exchange)
    real_replace = os.replace
    calls = []

    def killed_after_first_rename(src, dst):
        calls.append(Path(dst).name)
        if Path(src) == target:  # the old folder moved aside
            real_replace(src, dst)
            raise InjectedFault("between the renames")
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(atomic.os, "replace", killed_after_first_rename)
        patch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)  # the process is dead: no clean-up
        with pytest.raises(InjectedFault):
            _save(new, new_report, target, False)
    assert not target.exists() and any(".old-" in n for n in _siblings(target))
    # The next save (or any save) first puts the previous checkpoint back, then replaces it.
    atomic.recover(target)
    assert _snapshot(target) == before
    _save(new, new_report, target, False)
    assert _siblings(target) == [] and all((target / name).is_file() for name in USER)


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from hub_fixtures import OFFLOAD_LAYER_1, make_report, prune_by_magnitude, tiny_llama
    import optimum_mwanda.hub.atomic as atomic
    from optimum_mwanda.hub import save_pruned_model

    kill_at = sys.argv[2]
    real = {{"exchange_paths": atomic.exchange_paths, "rmtree": atomic.shutil.rmtree, "link": os.link}}

    def killer(name):
        def wrapper(*args, **kwargs):
            if name == kill_at and name != "exchange_paths":
                os.kill(os.getpid(), signal.SIGKILL)  # before the operation
            result = real[name](*args, **kwargs)
            if name == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # right after the atomic swap
            return result
        return wrapper

    atomic.exchange_paths = killer("exchange_paths")
    atomic.shutil.rmtree = killer("rmtree")
    atomic.os.link = killer("link")
    model = tiny_llama(seed=2)
    prune_by_magnitude(model, 0.6)
    save_pruned_model(model, sys.argv[1], make_report(model, ["en", "de"]), compressed=True)
    """
)


@pytest.mark.parametrize("kill_at", ["link", "exchange_paths", "rmtree"])
def test_sigkill_during_a_save(two_models, tmp_path, kill_at):
    (old, old_report), (new, new_report) = two_models
    target = tmp_path / "work" / "ckpt"
    _save(old, old_report, target, True)
    _user_files(target)
    before = _snapshot(target)
    script = tmp_path / "kill.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(target), kill_at], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    after = _snapshot(target)
    assert {n: d for n, d in after.items() if n in USER} == {n: d for n, d in before.items() if n in USER}
    if kill_at == "link":  # before the commit point
        assert after == before
    else:  # after it: the new checkpoint, complete
        loaded = load_pruned_model(target)
        assert not torch.equal(
            loaded.model.layers[0].mlp.up_proj.weight, old.model.layers[0].mlp.up_proj.weight
        )
    assert _siblings(target) != []  # the killed save left its staging or the old copy...
    _save(new, new_report, target, True)
    assert _siblings(target) == []  # ...which the next save removed
    assert all((target / name).is_file() for name in USER)
