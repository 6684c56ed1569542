"""Data-parallel calibration over ``torch.distributed``.

When a process group is initialised (by ``torchrun``, ``accelerate launch`` or the caller), every rank
runs the same ``Pruner.prune_model`` call on the same model and calibration set. Each rank captures and
propagates only its shard of the calibration sequences; the raw sums every method accumulates (see
``parts.statistics``) are added over all ranks before any mask or weight update is computed, so all
ranks compute the same new weights, and only rank 0 writes files.

Why the result equals a single-process run: a sequence's hidden states do not depend on which other
sequences share its batch, the statistics are sums over tokens accumulated in float64 of float32 parts
that depend only on their own sequences (one sequence, or for the Hessian one group of consecutive
sequences, which is why shards are dealt in whole groups), so the order of the additions only moves the
last float64 bits, which the float32 statistics derived from them do not see, and the sums are
all-reduced in float64. What remains is checked,
not assumed: after each layer the ranks compare a checksum of their new weights and rank 0's weights are
broadcast if they differ.

Everything here is a no-op when no process group is initialised. This is the lowest layer: it knows
tensors, picklable values and the small typed protocols below, never the calibration or statistics classes
(the statistics collector sums itself: ``LayerStatisticsCollector.synchronise``, built on
:func:`all_reduce_sums` and :func:`agree_on_layout`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Set while rank 0 runs a function for all ranks, so that a nested guarded call (a push that saves) runs
# plainly instead of waiting for ranks that are not there.
_on_main = threading.local()


class DistributedMismatchError(RuntimeError):
    """Ranks were given different models, configs or calibration data."""


class RankValidationError(RuntimeError):
    """Another rank refused the run in its validation phase (its error is in the message); nothing changed."""


class MainProcessError(RuntimeError):
    """What rank 0 was doing on behalf of all ranks (a write, a push) failed there."""


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the process group.

    Attributes:
        rank: this process's rank (0 without a process group).
        world_size: number of processes (1 without a process group).
        backend: the process group's backend (``"gloo"``, ``"nccl"``...) or ``None``.
    """

    rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """A process group is initialised (even of one process: the collectives then run, trivially)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """The device collectives run on: the current CUDA device for NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def current_context() -> DistributedContext:
    """The default process group's rank and world size (rank 0 of 1 when there is none)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext()
    return DistributedContext(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()))


def local_device() -> torch.device:
    """This rank's compute device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def launched_distributed() -> bool:
    """The environment of a multi-process launch (``torchrun``, ``accelerate launch``): ``WORLD_SIZE > 1``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def initialize_from_environment(
    backend: str | None = None, timeout: datetime.timedelta | None = None
) -> DistributedContext:
    """Initialise the default process group from a launcher's environment variables, if there are any.

    ``torchrun`` and ``accelerate launch`` set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``; this joins that group (``nccl`` when CUDA is available, else ``gloo``) and selects
    ``cuda:LOCAL_RANK``. Does nothing when a group already exists or the launch is single-process.
    """
    dist = torch.distributed
    if dist.is_available() and not dist.is_initialized() and launched_distributed():
        device = local_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        kwargs: dict[str, Any] = {"backend": backend or ("nccl" if device.type == "cuda" else "gloo")}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if kwargs["backend"] == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return current_context()


@contextlib.contextmanager
def launcher_process_group(backend: str | None = None) -> Iterator[DistributedContext]:
    """:func:`initialize_from_environment` for the duration of a ``with`` block; a group this call joined
    is destroyed at its end (one that already existed is left to its owner)."""
    dist = torch.distributed
    already = dist.is_available() and dist.is_initialized()
    context = initialize_from_environment(backend)
    try:
        yield context
    finally:
        if context.enabled and not already:
            dist.destroy_process_group()


# -- sharding -----------------------------------------------------------------------------------------
def shard_sequences(languages: Sequence[str], rank: int, world_size: int, group_size: int = 1) -> list[int]:
    """Indices of the calibration sequences rank ``rank`` of ``world_size`` handles, in ascending order.

    Sequences are dealt in groups of ``group_size`` consecutive ones (the last group may be shorter):
    a statistic that multiplies a group's sequences together (``parts.statistics.HessianStatistics`` with
    the same ``sequence_group``) then forms on every rank the very products one process forms, because a
    rank's shard is whole groups in ascending order. Groups are dealt round-robin, language by language
    (each group counts under its first sequence's language, languages in order of first appearance), with
    one counter running across languages: every rank gets each language's groups in turn, and the ranks'
    group counts differ by at most one (their sequence counts by at most ``group_size``). A set of fewer
    groups than ranks leaves some ranks without any; rank 0 always gets the first group. The same inputs
    always give the same shards, and the shards of all ranks are disjoint and cover every sequence.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not a rank of a world of {world_size}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    starts: dict[str, list[int]] = {}
    for start in range(0, len(languages), group_size):
        starts.setdefault(languages[start], []).append(start)
    mine: list[int] = []
    counter = 0
    for group_starts in starts.values():
        for start in group_starts:
            if counter % world_size == rank:
                mine.extend(range(start, min(start + group_size, len(languages))))
            counter += 1
    return sorted(mine)


def local_indices(
    languages: Sequence[str], context: DistributedContext | None = None, group_size: int = 1
) -> torch.Tensor:
    """:func:`shard_sequences` for this process, as a ``LongTensor`` (all sequences in one process)."""
    context = context or current_context()
    return torch.tensor(
        shard_sequences(languages, context.rank, context.world_size, group_size), dtype=torch.long
    )


class ShardableSet(Protocol):
    """What :func:`local_batches` reads of a calibration set (a ``CalibrationSet``)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def languages(self) -> Sequence[str]: ...

    @property
    def language_index(self) -> torch.Tensor: ...

    def batches(self, batch_size: int) -> list[dict[str, torch.Tensor]]: ...


def local_batches(
    calibration: ShardableSet,
    batch_size: int,
    context: DistributedContext | None = None,
    group_size: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """This rank's batches of a ``CalibrationSet``: :meth:`CalibrationSet.batches` of its shard (whole
    groups of ``group_size`` sequences, :func:`shard_sequences`), with each sequence's language index that
    of the full set (so per-language statistics line up across ranks)."""
    context = context or current_context()
    if not context.enabled:
        return calibration.batches(batch_size)
    calibration.batches(batch_size)  # validates batch_size
    index = local_indices(calibration.languages, context, group_size)
    input_ids, attention_mask = calibration.input_ids[index], calibration.attention_mask[index]
    language = calibration.language_index[index]
    return [
        {
            "input_ids": input_ids[start : start + batch_size],
            "attention_mask": attention_mask[start : start + batch_size],
            "language": language[start : start + batch_size],
        }
        for start in range(0, len(index), batch_size)
    ]


# -- agreement between ranks --------------------------------------------------------------------------
_SAME_RUN_HINT = (
    "were given a different model, pruning config or calibration set than rank 0 (run fingerprints "
    "differ): every rank must call prune_model with the same model weights, config and calibration data"
)


def check_same_run(
    fingerprint: Any, context: DistributedContext | None = None, what: str = _SAME_RUN_HINT
) -> None:
    """Refuse to go on unless every rank computed the same ``fingerprint`` (model, config, calibration).

    Raises :class:`DistributedMismatchError` on every rank, naming the ranks that differ from rank 0
    (``what`` completes the message). Nothing has been changed when it raises.
    """
    context = context or current_context()
    if not context.enabled:
        return
    gathered: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(gathered, fingerprint)
    differing = [rank for rank, value in enumerate(gathered) if value != gathered[0]]
    if differing:
        raise DistributedMismatchError(
            f"rank(s) {differing} of {context.world_size} {what}. Nothing was pruned."
        )


def agree_on_run(
    fingerprint: str | None,
    error: BaseException | None = None,
    *,
    checkpointed: bool = False,
    context: DistributedContext | None = None,
) -> None:
    """The agreement every rank reaches after validating its ``prune_model`` call, before any work.

    Each rank brings its verdict: ``error`` (its validation failed) or the ``fingerprint`` of its run and
    whether it was given a ``checkpoint_dir``. One ``all_gather`` exchanges them, so no rank waits for one
    that already gave up. Then, on every rank: if any rank failed, the failing ranks re-raise their own
    ``error`` and the others raise :class:`RankValidationError` naming the failing ranks and their errors;
    else ranks whose fingerprint differs from rank 0's (or that disagree on ``checkpoint_dir``) make every
    rank raise :class:`DistributedMismatchError`. Nothing has been changed when it raises. In a single
    process it only re-raises ``error``.
    """
    context = context or current_context()
    if not context.enabled:
        if error is not None:
            raise error
        return
    verdict = {
        "error": None if error is None else f"{type(error).__name__}: {error}",
        "fingerprint": fingerprint,
        "checkpointed": bool(checkpointed),
    }
    verdicts: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(verdicts, verdict)
    failed = [rank for rank, v in enumerate(verdicts) if v["error"] is not None]
    if failed:
        if error is not None:
            raise error
        details = "; ".join(f"rank {rank}: {verdicts[rank]['error']}" for rank in failed)
        raise RankValidationError(
            f"rank(s) {failed} of {context.world_size} refused the run in validation ({details}). "
            "Nothing was pruned."
        )
    differing = [rank for rank, v in enumerate(verdicts) if v["fingerprint"] != verdicts[0]["fingerprint"]]
    if differing:
        raise DistributedMismatchError(
            f"rank(s) {differing} of {context.world_size} {_SAME_RUN_HINT}. Nothing was pruned."
        )
    with_checkpoint = [rank for rank, v in enumerate(verdicts) if v["checkpointed"]]
    if with_checkpoint and len(with_checkpoint) != context.world_size:
        raise DistributedMismatchError(
            f"checkpoint_dir was given on rank(s) {with_checkpoint} of {context.world_size} only: pass it on "
            "every rank (one folder that every rank sees; rank 0 writes, the others read), or on none. "
            "Nothing was pruned."
        )


# -- reduction of statistics --------------------------------------------------------------------------
def _to_comm(tensor: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    return tensor.to(device=context.device, dtype=torch.float64).contiguous()


def all_reduce_sums(
    sums: Mapping[str, torch.Tensor], context: DistributedContext | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """``sums`` added over all ranks (in float64, each back in its own dtype and device) and the bytes
    all-reduced (0 in a single process, where ``sums`` come back as they are).

    The tensors are packed into one buffer (one collective); reducing in float64 makes the sum of the ranks'
    partial sums match a single process's sum.
    """
    context = context or current_context()
    if not context.enabled or not sums:
        return dict(sums), 0
    names = list(sums)
    flat = torch.cat([_to_comm(sums[name], context).reshape(-1) for name in names])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    sent = flat.numel() * flat.element_size()
    reduced, offset = {}, 0
    for name in names:
        tensor = sums[name]
        part = flat[offset : offset + tensor.numel()].view(tensor.shape)
        reduced[name] = part.to(device=tensor.device, dtype=tensor.dtype)
        offset += tensor.numel()
    return reduced, sent


class RawSums(Protocol):
    """A statistic made of raw sums (``parts.statistics``): adding two ranks' sums gives the statistic of
    both shards together."""

    def raw_sums(self) -> dict[str, torch.Tensor]: ...

    def load_raw_sums(self, sums: dict[str, torch.Tensor]) -> None: ...


def all_reduce_statistics(statistics: Sequence[RawSums], context: DistributedContext | None = None) -> int:
    """Replace every statistic's raw sums by their sum over all ranks (:func:`all_reduce_sums`, one
    collective per statistic); returns the bytes all-reduced (0 in a single process)."""
    sent = 0
    for statistic in statistics:
        reduced, size = all_reduce_sums(statistic.raw_sums(), context)
        statistic.load_raw_sums(reduced)
        sent += size
    return sent


L = TypeVar("L")


def agree_on_layout(layout: L, context: DistributedContext | None = None, what: str = "layouts") -> L:
    """The one non-empty ``layout`` every rank found (a rank that saw no data passes an empty one and gets
    the others'). :class:`DistributedMismatchError` on every rank when two ranks found different ones."""
    context = context or current_context()
    if not context.enabled:
        return layout
    layouts: list[Any] = [None] * context.world_size
    torch.distributed.all_gather_object(layouts, layout)
    found = [value for value in layouts if value]
    if not found:
        return layout
    if any(value != found[0] for value in found):
        raise DistributedMismatchError(f"the ranks found different {what}: different models?")
    return found[0]


# -- identical weights on every rank ------------------------------------------------------------------
def tensor_checksum(tensor: torch.Tensor) -> int:
    """An exact, position-sensitive integer checksum of a tensor's bits, computed on its own device."""
    data = tensor.detach().contiguous().reshape(-1)
    if data.element_size() == 2:
        bits = data.view(torch.int16).long()
    elif data.element_size() == 4:
        bits = data.view(torch.int32).long()
    elif data.element_size() == 8:
        bits = data.view(torch.int64)
    else:
        bits = data.view(torch.uint8).long()
    position = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 1_000_003 + 1
    return int((bits * position).sum()) ^ bits.numel()


def synchronise_weights(tensors: Sequence[torch.Tensor], context: DistributedContext | None = None) -> bool:
    """Make ``tensors`` (in place) equal to rank 0's on every rank.

    Every rank computed them from the same reduced statistics, so they are normally bit-identical already:
    only a checksum per tensor is exchanged. If any rank differs, rank 0's tensors are broadcast. Returns
    ``True`` when they were already identical (and in a single process).
    """
    context = context or current_context()
    if not context.enabled or not tensors:
        return True
    sums = torch.tensor([tensor_checksum(t) for t in tensors], dtype=torch.int64, device=context.device)
    gathered = [torch.empty_like(sums) for _ in range(context.world_size)]
    torch.distributed.all_gather(gathered, sums)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return True
    logger.warning("ranks computed different pruned weights; using rank 0's (broadcast)")
    for tensor in tensors:
        buffer = tensor.detach().to(context.device).contiguous()
        torch.distributed.broadcast(buffer, src=0)
        tensor.copy_(buffer.to(tensor.device))
    return False


# -- rank 0 writes ------------------------------------------------------------------------------------
def barrier(context: DistributedContext | None = None) -> None:
    context = context or current_context()
    if context.enabled:
        torch.distributed.barrier()


def broadcast_object(value: Any, context: DistributedContext | None = None) -> Any:
    """Rank 0's ``value`` on every rank (pickled)."""
    context = context or current_context()
    if not context.enabled:
        return value
    box = [value if context.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def run_on_main_process(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``function`` on rank 0 only; every other rank waits for it and gets its result.

    If it fails on rank 0, the other ranks raise :class:`MainProcessError` instead of waiting forever. In a
    single process this is a plain call.
    """
    context = current_context()
    if not context.enabled or getattr(_on_main, "active", False):
        return function(*args, **kwargs)
    if context.is_main:
        _on_main.active = True
        try:
            result = function(*args, **kwargs)
        except BaseException as error:
            broadcast_object(("error", f"{type(error).__name__}: {error}"), context)
            raise
        finally:
            _on_main.active = False
        try:
            broadcast_object(("ok", result), context)
        except Exception:  # an unpicklable result: the others learn it succeeded
            broadcast_object(("ok", None), context)
        return result
    status, payload = broadcast_object(None, context)
    if status == "error":
        raise MainProcessError(f"rank 0 failed: {payload}")
    return payload


def main_process_only(function: Callable[..., T]) -> Callable[..., T]:
    """Decorator form of :func:`run_on_main_process` (for the functions that write files or push)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return run_on_main_process(function, *args, **kwargs)

    return wrapper
