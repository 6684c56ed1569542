"""A ``transformers.Trainer`` callback that keeps pruned weights at zero during fine-tuning.

Importing this module imports ``transformers.trainer_callback`` (seconds), so ``optimum_mwanda`` only
loads it when ``SparsityPreservingCallback`` is first asked for.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .keeper import SparsityKeeper


class SparsityPreservingCallback(TrainerCallback):
    """Keep the pruned (exactly zero) weights of the Trainer's model at zero while it trains.

    At train begin it records the masks of the model's pruned modules (see :class:`SparsityKeeper`) and
    registers gradient hooks; after every optimizer step it writes the zeros back; at train end it applies
    them once more and removes its hooks. Works for full fine-tuning and for peft models (LoRA keeps the
    base frozen; merge with :func:`optimum_mwanda.training.merge_and_reprune`).

    Args:
        model: record the masks now, from this model, instead of at train begin from the Trainer's model.
        ignore: module-name patterns to leave alone (default: ``model.config.sparsity_config["ignore"]``).
        zero_gradients: also zero the gradients of pruned weights, so optimizer state never moves them.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[SparsityPreservingCallback()])
        trainer.train()
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        ignore: Sequence[str] | None = None,
        zero_gradients: bool = True,
    ) -> None:
        self.ignore = None if ignore is None else list(ignore)
        self.zero_gradients = zero_gradients
        # Masks recorded now are validated now: a dense model fails here, not in the middle of train().
        self.keeper: SparsityKeeper | None = (
            None if model is None else SparsityKeeper(model, ignore=self.ignore, zero_gradients=False)
        )

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs,
    ) -> None:
        if self.keeper is None:
            if model is None:
                raise ValueError("SparsityPreservingCallback got no model at train begin; pass model= to it")
            self.keeper = SparsityKeeper(model, ignore=self.ignore, zero_gradients=False)
        elif model is not None and not self.keeper.tracks(model):
            raise ValueError("SparsityPreservingCallback was built for a different model than the Trainer's")
        # A second train() call (or a resumed run) starts from the kept masks, not from the current zeros.
        self.keeper.apply()
        if self.zero_gradients:
            self.keeper.register_gradient_hooks()

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        # Right after optimizer.step(), before the scheduler, logging, evaluation or checkpointing see them.
        if self.keeper is not None:
            self.keeper.apply()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        if self.keeper is not None:
            self.keeper.close()
