"""Merging LoRA adapters into a pruned model without losing its sparsity."""

from __future__ import annotations

from typing import Any

from torch import nn

from .keeper import SparsityKeeper


def merge_and_reprune(
    peft_model: nn.Module, keeper: SparsityKeeper | None = None, **merge_kwargs: Any
) -> nn.Module:
    """Merge a peft (LoRA) model into its pruned base and put the pruned zeros back.

    A LoRA update ``B @ A`` is dense, so ``merge_and_unload()`` alone fills every pruned weight. This merges,
    then zeroes the pruned positions again: the merged model keeps the original masks, and the part of the
    adapter's update that fell on pruned weights is dropped (measure the merged model; it is usually close to
    the unmerged one when the adapter is small).

    Args:
        peft_model: a peft model (``get_peft_model(pruned_model, LoraConfig(...))``) whose base is the pruned
            model; its adapters must not be merged yet.
        keeper: the :class:`SparsityKeeper` recorded on the pruned model before training. Default: record the
            masks now from the base weights, which LoRA training leaves untouched (they are frozen).
        **merge_kwargs: passed to ``merge_and_unload`` (e.g. ``safe_merge=True``, ``adapter_names=[...]``).

    Returns:
        The merged plain transformers model, with exactly the pruned masks of the base.

    Raises:
        TypeError: ``peft_model`` has no ``merge_and_unload`` (not a peft model).
    """
    merge = getattr(peft_model, "merge_and_unload", None)
    if not callable(merge):
        raise TypeError(
            f"merge_and_reprune needs a peft model with merge_and_unload(), got {type(peft_model).__name__}"
        )
    if keeper is None:
        # The base layers are frozen under LoRA, so their zeros are still exactly the pruned ones.
        keeper = SparsityKeeper(peft_model, zero_gradients=False)
    merged = merge(**merge_kwargs)
    # merge_and_unload puts each tuner layer's base module back in place, the same module objects the keeper
    # holds, so the recorded masks apply to the merged model directly.
    if not keeper.tracks(merged):
        raise RuntimeError("the merged model does not contain the modules whose masks were recorded")
    keeper.close()
    return merged
