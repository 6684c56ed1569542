"""Fault-injection sweep of the resume checkpoint: a fault at EVERY file-system step of a checkpointed run,
then a resume in a fresh model, must give bit-identical weights to an uninterrupted run, or a clear refusal.

The steps are counted in a clean run (every mkdir, open, mid-write, fsync, rename, directory fsync and
unlink ``optimum_mwanda.resume`` performs); then for each index k the run faults right before the k-th step,
in-process (an exception nothing catches) for Wanda, M-Wanda (default config) and SparseGPT, and by a real
SIGKILL of a child process for Wanda.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fault_injection as fi
import pytest
import torch

from optimum_mwanda.resume import STATE_FILE, CheckpointError

METHODS = ["wanda", "mwanda", "sparsegpt"]


def _reference(method: str):
    model, report = fi.prune(method, None)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, report


def _resume_outcome(method: str, checkpoint_dir: Path, expected, expected_report) -> str:
    """Resume in a fresh model: ``"identical"``, ``"refused"`` (a clear CheckpointError) or ``"wrong"``."""
    try:
        model, report = fi.prune(method, checkpoint_dir)
    except CheckpointError:
        return "refused"
    got = model.state_dict()
    same = all(torch.equal(got[name], weight) for name, weight in expected.items())
    same = same and report.layer_sparsity == expected_report.layer_sparsity
    same = same and report.module_sparsity == expected_report.module_sparsity
    return "identical" if same else "wrong"


def _only_final_files(checkpoint_dir: Path, num_layers: int) -> bool:
    names = {p.name for p in checkpoint_dir.iterdir()}
    return names == {STATE_FILE} | {f"layer_{i}.safetensors" for i in range(num_layers)}


def _judge(method: str, label: str, folders: list[Path], steps, expected, expected_report) -> None:
    """Resume each interrupted checkpoint (the k-th faulted at ``steps[k]``) in a fresh model: every one
    must be identical to the uninterrupted run (and leave only the final files), none refused nor wrong."""
    num_layers = len(expected_report.layer_sparsity)
    outcomes: dict[str, list[int]] = {"identical": [], "refused": [], "wrong": []}
    for k, checkpoint_dir in enumerate(folders):
        outcome = _resume_outcome(method, checkpoint_dir, expected, expected_report)
        outcomes[outcome].append(k)
        if outcome == "identical":
            assert _only_final_files(checkpoint_dir, num_layers), sorted(os.listdir(checkpoint_dir))
    print(
        f"\n{method}, {label}: {len(folders)} fault points, identical {len(outcomes['identical'])}, "
        f"refused {len(outcomes['refused'])}, wrong {len(outcomes['wrong'])}"
    )
    assert not outcomes["wrong"], [steps[k] for k in outcomes["wrong"]]
    # A crash never makes a checkpoint unusable: no refusal either.
    assert not outcomes["refused"], [steps[k] for k in outcomes["refused"]]


def _clean_steps(method: str, tmp_path: Path, expected, expected_report) -> list[tuple[str, str]]:
    with fi.io_steps() as steps:
        model, report = fi.prune(method, tmp_path / "clean")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert report.layer_sparsity == expected_report.layer_sparsity
    return list(steps)


@pytest.mark.parametrize("method", METHODS)
def test_raise_at_every_checkpoint_step(method, tmp_path, monkeypatch):
    # fsync only matters when the machine itself goes down, which no in-process fault simulates (the
    # fsync steps are still fault points): skipped here, it took half of each run's wall time on a busy
    # disk. The SIGKILL sweep below and every other test run it for real.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    expected, expected_report = _reference(method)
    steps = _clean_steps(method, tmp_path, expected, expected_report)
    operations = {operation for operation, _ in steps}
    assert {"open", "write", "fsync", "rename", "fsync-dir", "unlink"} <= operations
    folders = [tmp_path / f"fault{k}" for k in range(len(steps))]
    for k, checkpoint_dir in enumerate(folders):
        with fi.io_steps(fi.raise_at(k)), pytest.raises(fi.InjectedFault):
            fi.prune(method, checkpoint_dir)
    _judge(method, "raise", folders, steps, expected, expected_report)


@pytest.mark.parametrize(
    "first_fault", [("write", ".tmp-hidden_2.safetensors"), ("unlink", "hidden_2.safetensors")]
)
def test_raise_again_at_every_step_of_the_resumed_run(first_fault, tmp_path, monkeypatch):
    """A resumed run that is itself interrupted at any of its steps still resumes identically."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # as above
    method = "mwanda"
    expected, expected_report = _reference(method)

    def interrupted(folder: Path) -> Path:
        with fi.io_steps(fi.raise_before(*first_fault)), pytest.raises(fi.InjectedFault):
            fi.prune(method, folder)
        return folder

    base = interrupted(tmp_path / "base")
    with fi.io_steps() as steps:  # the steps of a clean resume from there
        fi.prune(method, base)
    assert steps
    folders = [interrupted(tmp_path / f"again{k}") for k in range(len(steps))]
    for k, checkpoint_dir in enumerate(folders):
        with fi.io_steps(fi.raise_at(k)), pytest.raises(fi.InjectedFault):
            fi.prune(method, checkpoint_dir)
    _judge(method, f"second fault after {first_fault}", folders, steps, expected, expected_report)


def _sigkill_sweep(method: str, tmp_path: Path, kill_each) -> None:
    """``kill_each(count)`` runs ``count`` children, the k-th into ``tmp_path / f"kill{k}"`` killed at step k,
    and returns their return codes."""
    expected, expected_report = _reference(method)
    steps = _clean_steps(method, tmp_path, expected, expected_report)
    codes = kill_each(len(steps))
    for k, code in enumerate(codes):
        assert code == -signal.SIGKILL, f"step {k} {steps[k]}: child exited with {code}"
    folders = [tmp_path / f"kill{k}" for k in range(len(steps))]
    _judge(method, "SIGKILL", folders, steps, expected, expected_report)


def _child(*args: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
    script = Path(fi.__file__)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(script.parent), os.environ.get("PYTHONPATH", "")]))
    if kill_at is not None:
        env[fi.KILL_AT_ENV] = str(kill_at)
    return subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=600
    )


def test_sigkill_at_every_checkpoint_step(tmp_path):
    """Real SIGKILLs of child processes, forked by one driver process (see ``fault_injection.kill_each``)."""

    def kill_each(count: int) -> list[int]:
        done = _child("--each", "wanda", str(tmp_path), str(count))
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    _sigkill_sweep("wanda", tmp_path, kill_each)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_sigkill_fresh_interpreter_at_every_checkpoint_step(method, tmp_path):
    """The same with a fresh ``python`` per kill point (seconds each: minutes per method)."""

    def kill_each(count: int) -> list[int]:
        return [_child(method, str(tmp_path / f"kill{k}"), kill_at=k).returncode for k in range(count)]

    _sigkill_sweep(method, tmp_path, kill_each)
