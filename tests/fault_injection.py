"""Fault injection for the resume checkpoint: raise or SIGKILL at the k-th file-system step it performs.

``optimum_mwanda.resume._io_event`` is called right before every mkdir, open, (mid-)write, fsync, rename,
directory fsync and unlink of a checkpoint; replacing it lets a test count those steps in a clean run and
then fault at each one. Also runnable as a script (or in a forked child): the run is killed with SIGKILL at
the step whose index ``$OPTIMUM_MWANDA_TEST_KILL_AT`` gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tiny_models import make_model, make_token_calibration

from optimum_mwanda import MWandaConfig, Pruner, SparseGPTConfig, WandaConfig
from optimum_mwanda import resume as resume_module

KILL_AT_ENV = "OPTIMUM_MWANDA_TEST_KILL_AT"
ARCHITECTURE = "llama"  # 3 decoder layers


class InjectedFault(BaseException):
    """Raised at an injected fault; a BaseException so that nothing on the way swallows it, like a kill."""


def make_config(method: str):
    if method == "wanda":
        return WandaConfig()
    if method == "mwanda":
        return MWandaConfig()  # the defaults: per-language mean compensation, depth schedule
    if method == "sparsegpt":
        return SparseGPTConfig(block_size=32)
    raise ValueError(method)


def calibration() -> dict[str, torch.Tensor]:
    return make_token_calibration(n=2, seq_len=16)


def prune(method: str, checkpoint_dir: str | os.PathLike | None, model=None):
    """Prune a fresh tiny model (or ``model``); returns ``(model, report)``."""
    model = make_model(ARCHITECTURE) if model is None else model
    report = Pruner(make_config(method)).prune_model(
        model, calibration(), show_progress=False, checkpoint_dir=checkpoint_dir
    )
    return model, report


@contextlib.contextmanager
def io_steps(action=None) -> Iterator[list[tuple[str, str]]]:
    """Record every checkpoint file-system step as ``(operation, file name)``; call
    ``action(index, operation, file name)`` before each one (it may raise or kill)."""
    steps: list[tuple[str, str]] = []

    def event(operation: str, path: Path) -> None:
        index, name = len(steps), Path(path).name
        steps.append((operation, name))
        if action is not None:
            action(index, operation, name)

    original = resume_module._io_event
    resume_module._io_event = event
    try:
        yield steps
    finally:
        resume_module._io_event = original


def raise_at(k: int):
    def action(index: int, operation: str, name: str) -> None:
        if index == k:
            raise InjectedFault(f"fault at checkpoint step {k} ({operation} {name})")

    return action


def raise_before(operation: str, name: str):
    """Fault right before the first step ``operation`` on the file ``name``."""

    def action(index: int, step_operation: str, step_name: str) -> None:
        if (step_operation, step_name) == (operation, name):
            raise InjectedFault(f"fault at checkpoint step {index} ({operation} {name})")

    return action


def kill_at(k: int):
    def action(index: int, operation: str, name: str) -> None:
        if index == k:
            os.kill(os.getpid(), signal.SIGKILL)

    return action


def run_killed(method: str, checkpoint_dir: str) -> None:
    """Prune with a checkpoint and SIGKILL this process at step ``$OPTIMUM_MWANDA_TEST_KILL_AT``."""
    torch.set_num_threads(1)
    with io_steps(kill_at(int(os.environ[KILL_AT_ENV]))):
        prune(method, checkpoint_dir)


def kill_each(method: str, root: Path, count: int) -> list[int]:
    """For k in ``range(count)``: fork a child that runs :func:`run_killed` with ``$OPTIMUM_MWANDA_TEST_KILL_AT``
    = k into ``root / f"kill{k}"``; the children's wait statuses as return codes (-9: killed).

    This process only imports (torch, transformers, the package) and never computes, so each fork is a fresh
    run that starts in milliseconds instead of a new interpreter's seconds, with no OpenMP pool to inherit.
    """
    codes = []
    for k in range(count):
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.environ[KILL_AT_ENV] = str(k)
                run_killed(method, str(root / f"kill{k}"))
            finally:
                os._exit(3)  # not killed: the parent reports it
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    return codes


if __name__ == "__main__":
    # python fault_injection.py METHOD CHECKPOINT_DIR        (kill at step $OPTIMUM_MWANDA_TEST_KILL_AT)
    # python fault_injection.py --each METHOD ROOT COUNT     (one forked child per step; prints JSON codes)
    if sys.argv[1] == "--each":
        print(json.dumps(kill_each(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
    else:
        run_killed(sys.argv[1], sys.argv[2])
