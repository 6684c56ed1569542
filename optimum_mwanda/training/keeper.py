"""Keep the pruned weights of a model at exactly zero while it is fine-tuned.

:class:`SparsityKeeper` records, once, which weights are pruned (exactly zero) and then offers two
guarantees that work together:

* gradient hooks (``zero_gradients=True``) zero the gradient of every pruned weight as it is computed, so
  the optimizer's state never sees it: with AdamW the moments of a pruned weight stay 0, its update is 0 and
  decoupled weight decay of a 0 is 0, so the weight does not move at all;
* :meth:`SparsityKeeper.apply` writes the zeros back after an optimizer step. This is the guarantee that
  holds whatever the optimizer does (coupled weight decay, optimizers that add noise or momentum from
  earlier state, someone assigning weights by hand).

Use it from a custom loop with :func:`preserve_sparsity`, or from ``transformers.Trainer`` with
:class:`optimum_mwanda.training.SparsityPreservingCallback`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .masks import count_revived, find_pruned_modules, pruned_mask, zero_masked_


@dataclass
class _MaskedWeight:
    """One pruned module and the mask of its pruned weights (``True`` = pruned), in the weight's layout."""

    module: nn.Module
    mask: torch.Tensor
    _on_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    @property
    def weight(self) -> torch.Tensor:
        # Looked up on every use: peft's safe merge and some loaders replace ``weight.data`` or the parameter.
        return self.module.weight

    def mask_on(self, device: torch.device) -> torch.Tensor:
        """The mask on ``device`` (copied once per device: the Trainer may move the model after recording)."""
        if self.mask.device == device:
            return self.mask
        if device not in self._on_device:
            self._on_device[device] = self.mask.to(device)
        return self._on_device[device]


def _mask_gradient(entry: _MaskedWeight, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(entry.mask_on(grad.device), 0)


def _recorded_ignore(model: nn.Module) -> list[str]:
    """The ``ignore`` patterns a saved pruned model records in ``config.sparsity_config`` (else none)."""
    config = getattr(model, "config", None)
    sparsity_config = getattr(config, "sparsity_config", None) or {}
    if not isinstance(sparsity_config, dict):
        return []
    return [str(pattern) for pattern in sparsity_config.get("ignore", []) or []]


class SparsityKeeper:
    """The masks of a pruned model's zero weights, and the means to keep those weights at zero.

    Args:
        model: a pruned transformers causal LM (or a peft model wrapping one), in memory (not offloaded).
        ignore: module-name patterns to leave alone. Defaults to the ``ignore`` list recorded in
            ``model.config.sparsity_config`` (saved pruned checkpoints carry it), else none. Modules left dense
            by the pruner need no pattern: a module without exact zeros has nothing to keep.
        zero_gradients: register gradient hooks that zero the gradients of pruned weights, so the optimizer
            state never moves them (weights that do not require grad, e.g. LoRA's frozen base, get none).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``ignore`` is not a list of strings.
        ValueError: the model has no decoder layers, has offloaded (meta) weights, or has no exactly-zero
            weight in any prunable module (it was not pruned).

    Masks cost one byte per weight of the pruned modules. Example::

        keeper = SparsityKeeper(model)
        ...
        optimizer.step()
        keeper.apply()           # pruned weights are exactly zero again
        keeper.close()           # final apply, hooks removed
    """

    def __init__(
        self, model: nn.Module, *, ignore: Sequence[str] | None = None, zero_gradients: bool = True
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SparsityKeeper needs a torch.nn.Module, got {type(model).__name__}")
        if ignore is None:
            ignore = _recorded_ignore(model)
        elif isinstance(ignore, str) or not all(isinstance(pattern, str) for pattern in ignore):
            raise TypeError(f"ignore must be a list of module-name patterns (strings), got {ignore!r}")
        modules = find_pruned_modules(model, list(ignore))
        offloaded = [name for name, module in modules.items() if module.weight.device.type == "meta"]
        if offloaded:
            raise ValueError(
                f"modules {offloaded[:3]} have offloaded (meta) weights; load the model fully on devices "
                "(no CPU/disk offload) before fine-tuning it"
            )
        entries = {}
        for name, module in modules.items():
            mask = pruned_mask(module.weight)
            if bool(mask.any()):
                entries[name] = _MaskedWeight(module, mask)
        if not entries:
            raise ValueError(
                f"none of the {len(modules)} prunable modules has an exactly-zero weight: the model is not "
                "pruned (prune it with optimum_mwanda.Pruner, or load a pruned checkpoint, before fine-tuning)"
            )
        self._entries: dict[str, _MaskedWeight] = entries
        self._gradient_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._optimizer_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.zero_gradients = zero_gradients
        if zero_gradients:
            self.register_gradient_hooks()

    # -- what is kept --------------------------------------------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        """Names (in the unwrapped model) of the modules whose pruned weights are kept at zero."""
        return list(self._entries)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{module name: bool mask}``, ``True`` at pruned weights, in each weight's own layout."""
        return {name: entry.mask for name, entry in self._entries.items()}

    @property
    def num_pruned(self) -> int:
        """Total number of pruned weights being kept at zero."""
        return sum(int(entry.mask.sum()) for entry in self._entries.values())

    def tracks(self, model: nn.Module) -> bool:
        """Whether the modules this keeper masks belong to ``model``."""
        first = next(iter(self._entries.values())).module
        return any(module is first for module in model.modules())

    # -- keeping it -----------------------------------------------------------------------------------------
    def apply(self) -> None:
        """Write exact zeros back into every pruned weight (call after each optimizer step)."""
        for entry in self._entries.values():
            weight = entry.weight
            zero_masked_(weight, entry.mask_on(weight.device))

    def count_revived(self) -> int:
        """How many pruned weights are currently not exactly zero (0 right after :meth:`apply`)."""
        return sum(count_revived(entry.weight, entry.mask) for entry in self._entries.values())

    def register_gradient_hooks(self) -> None:
        """Zero the gradients of pruned weights as autograd computes them (idempotent).

        Only weights that require grad get a hook. Hooks run before gradients accumulate into ``.grad``,
        so gradient accumulation, clipping and the optimizer all see zeros there.
        """
        if self._gradient_handles:
            return
        for entry in self._entries.values():
            weight = entry.weight
            if weight.requires_grad:
                hook = functools.partial(_mask_gradient, entry)
                self._gradient_handles.append(weight.register_hook(hook))

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Call :meth:`apply` automatically after every ``optimizer.step()`` (until :meth:`remove_hooks`)."""
        register = getattr(optimizer, "register_step_post_hook", None)
        if not callable(register):
            raise TypeError(
                f"expected a torch.optim.Optimizer (with register_step_post_hook), got {type(optimizer).__name__}"
            )
        self._optimizer_handles.append(register(lambda *_args, **_kwargs: self.apply()))

    def remove_hooks(self) -> None:
        """Remove the gradient hooks and optimizer hooks this keeper registered."""
        for handle in self._gradient_handles + self._optimizer_handles:
            handle.remove()
        self._gradient_handles.clear()
        self._optimizer_handles.clear()

    def close(self) -> None:
        """A final :meth:`apply`, then :meth:`remove_hooks`."""
        self.apply()
        self.remove_hooks()

    def __enter__(self) -> SparsityKeeper:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"SparsityKeeper(modules={len(self._entries)}, pruned_weights={self.num_pruned}, "
            f"gradient_hooks={len(self._gradient_handles)}, optimizer_hooks={len(self._optimizer_handles)})"
        )


@contextlib.contextmanager
def preserve_sparsity(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    ignore: Sequence[str] | None = None,
    zero_gradients: bool = True,
) -> Iterator[SparsityKeeper]:
    """Keep a pruned model's zero weights at zero inside a custom training loop.

    Args:
        model: the pruned model (or a peft model wrapping it).
        optimizer: when given, pruned weights are re-zeroed right after each ``optimizer.step()``; without
            it, call ``keeper.apply()`` after each step yourself.
        ignore, zero_gradients: as in :class:`SparsityKeeper`.

    Yields:
        The :class:`SparsityKeeper`. On exit (also on an exception) the zeros are applied a last time and
        every hook is removed.

    Example::

        with preserve_sparsity(model, optimizer):
            for batch in loader:
                model(**batch).loss.backward()
                optimizer.step()          # pruned weights are re-zeroed here
                optimizer.zero_grad()
    """
    keeper = SparsityKeeper(model, ignore=ignore, zero_gradients=zero_gradients)
    try:
        if optimizer is not None:
            keeper.attach_optimizer(optimizer)
        yield keeper
    finally:
        keeper.close()
