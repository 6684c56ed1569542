"""Checks run before any weight changes or any file is written: each a small function that raises a
``ValueError`` (``PermissionError`` for unwritable folders) whose message says what to change.

The pruner runs them in its validation phase; the command line runs the structural ones on a weightless
(``meta``) copy of the model built from ``config.json``, so that a bad argument exits before the weights are
loaded.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .modeling.adapters import canonical_name, unwrap_adapters
from .modeling.linear import PrunableLinear, matches_pattern
from .modeling.offload import iter_parameter_values, unloaded_parameters


class NonFiniteWeightsError(FloatingPointError, ValueError):
    """The model holds NaN or infinite weights (found before pruning; nothing was changed)."""


# -- model and config -------------------------------------------------------------------------------------
def position_limit(config: Any) -> int | None:
    """The longest input the model's position embeddings cover, when its config states one."""
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_sequence_length(seq_len: int, config: Any, what: str, hint: str) -> None:
    """``seq_len`` tokens per input must fit the model's position embeddings (``config`` of the model)."""
    limit = position_limit(config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"{what} is {seq_len} tokens but this model takes at most {limit} positions: {hint}")


def check_weights_loaded(model: nn.Module) -> None:
    """Refuse a model whose weights are on the ``meta`` device with nothing holding their values (built
    under ``init_empty_weights``/``torch.device("meta")``, or a load that did not finish)."""
    missing = unloaded_parameters(model)
    if missing:
        raise ValueError(
            f"the model's weights are not loaded ({missing[0]} and {len(missing) - 1} more are on the meta device and no Accelerate offload "
            "hook holds its values): load it with from_pretrained (device_map='auto' offloads what does "
            "not fit), or call load_state_dict(..., assign=True) before pruning"
        )


def check_finite_weights(model: nn.Module) -> None:
    """Every parameter must be finite: a NaN or inf anywhere (not only in the layer being pruned) makes
    the statistics of every later layer NaN. Offloaded weights are read from where they live."""
    bad: dict[str, None] = {}
    for name, tensor in iter_parameter_values(model):
        if tensor.is_floating_point() and not _all_finite(tensor):
            bad[name.rpartition(".")[0] or name] = None  # the module holding it
    if bad:
        names = list(bad)
        raise NonFiniteWeightsError(
            f"the weights of {', '.join(names[:5])}"
            + (f" and {len(names) - 5} more modules" if len(names) > 5 else "")
            + " hold NaN or infinite values: reload the model (a damaged checkpoint, or values that "
            "overflow its dtype?). Nothing was pruned."
        )


def _all_finite(tensor: torch.Tensor) -> bool:
    # Min and max propagate NaN and are inf when any value is: two reductions, no temporary the size of
    # the weight (25x faster than isfinite().all() on CPU).
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor.detach())
    return bool(torch.isfinite(low) & torch.isfinite(high))


# -- what gets pruned -------------------------------------------------------------------------------------
def check_nm_structure(
    layer_modules: Sequence[Sequence[PrunableLinear]], nm: tuple[int, int] | None, structure: str
) -> None:
    """An ``N:M`` mask needs every pruned module's input width divisible by ``M``."""
    if nm is None:
        return
    bad = [
        f"{m.name} ({m.in_features})" for modules in layer_modules for m in modules if m.in_features % nm[1]
    ]
    if bad:
        raise ValueError(
            f"mask_structure {structure!r} needs in_features divisible by {nm[1]}; not so for: "
            + ", ".join(bad[:5])
            + (" ..." if len(bad) > 5 else "")
        )


def check_compensation_rank(layer_modules: Sequence[Sequence[PrunableLinear]], rank: int | None) -> None:
    """An explicit ``compensation_rank``: directions of a module's input space exist only up to its input
    width, so a larger rank is refused here, before any work (``10**6`` would otherwise try to allocate a
    sketch of about 8 TB). The default rank (``None`` until resolved) is capped at each module's width."""
    if not rank:
        return
    modules = [m for group in layer_modules for m in group]
    if not modules:
        return
    narrowest = min(modules, key=lambda m: m.in_features)
    if rank > narrowest.in_features:
        raise ValueError(
            f"compensation_rank={rank} exceeds the input width of {narrowest.name} ({narrowest.in_features}): "
            "the rank counts directions of a module's input space, so it is at most the smallest input "
            f"width of the pruned modules, {narrowest.in_features} for this model"
            + " (or leave it unset: the default is capped at each module's width)"
        )


def check_ignore_patterns(model: nn.Module, patterns: Sequence[str]) -> None:
    """Every ``ignore`` pattern must match some module of ``model`` (a typo would silently prune what the
    user meant to keep). The error names the patterns and suggests close module names."""
    names = [canonical_name(name) for name, _ in unwrap_adapters(model).named_modules() if name]
    unmatched = [p for p in patterns if not any(matches_pattern(name, [p]) for name in names)]
    if not unmatched:
        return
    candidates = _pattern_candidates(names)
    parts = []
    for pattern in unmatched:
        close = difflib.get_close_matches(pattern, candidates, n=3, cutoff=0.6)
        parts.append(f"{pattern!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    raise ValueError(
        f"ignore pattern(s) {', '.join(parts)} match no module of this model: a pattern is a module-name "
        "glob or substring, e.g. '*.o_proj' or 'layers.0.'"
    )


def _pattern_candidates(names: Sequence[str]) -> list[str]:
    """Module names as a user would write them in ``ignore``: last components, with and without ``*.``,
    and full names with layer indices as ``*``."""
    candidates: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for k in (1, 2):
            if len(parts) >= k:
                tail = ".".join(parts[-k:])
                candidates[tail] = None
                candidates["*." + tail] = None
        candidates[re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)] = None
    return list(candidates)


# -- sizes and folders ------------------------------------------------------------------------------------
def parse_memory_size(value: int | str | None, what: str) -> int | None:
    """Bytes from an int or a size string (``"8GB"``, ``"8GiB"``, ``"512MB"``: Accelerate's parser, as
    ``max_memory`` takes them); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{what} must be a number of bytes or a size such as '8GB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must be >= 0 bytes, got {value}")
        return value
    from accelerate.utils import convert_file_size_to_int

    text = value.strip()
    try:
        return int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        raise ValueError(
            f"{what}={value!r} is not a size: use bytes or a number with a unit, e.g. '8GB', '8GiB', '512MB'"
        ) from None


def check_writable_folder(path: str | os.PathLike, what: str, staged_beside: bool = False) -> Path:
    """``path`` can be written: it is a writable folder, or the nearest folder that exists on the way to it
    is writable (so it can be created). ``staged_beside``: the write also creates a sibling of ``path``
    (an atomic save stages there), so the folder that holds ``path`` must be writable too.

    Nothing is created. Raises ``PermissionError`` (or ``NotADirectoryError``) naming the folder.
    """
    target = Path(os.path.abspath(Path(path).expanduser()))
    probes = [target.parent] if staged_beside else []
    if target.is_dir() or not staged_beside:
        probes.append(target)
    for probe in probes:
        existing = _nearest_existing(probe)
        if not existing.is_dir():
            raise NotADirectoryError(f"{what} {str(target)!r}: {str(existing)!r} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(
                f"{what} {str(target)!r} cannot be written: no write permission on {str(existing)!r}"
                + (
                    " (the save is staged beside the folder, in its parent)"
                    if staged_beside and probe != target
                    else ""
                )
            )
    return target


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path
