"""Capture what each decoder layer is called with, without running the decoder.

Every decoder layer is swapped for a stand-in that records its positional and keyword arguments (attention
masks, rotary position embeddings, ... which can differ per layer, e.g. Gemma 3's sliding and global layers)
and passes the hidden states straight through. The last stand-in stops the forward pass, so the final norm
and the LM head (the costliest part of a large-vocabulary model) never run. Only the first layer's hidden
states are kept: later layers get their inputs from the sequential pruning walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .decoder import DecoderStack
from .offload import execution_device


class _StopForward(Exception):
    """Raised by the last stand-in to end the capture pass early."""


class LayerReplayError(ValueError):
    """The decoder layers cannot be replayed one by one on the previous layer's outputs."""


class LayerReuseError(LayerReplayError):
    """A decoder layer runs more (or fewer) times than once per forward pass (looped or recurrent blocks):
    replaying each layer once on the previous one's outputs would not reproduce the model."""


@dataclass
class LayerCall:
    """The arguments of one decoder-layer call, hidden states excluded."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class CapturedInputs:
    """Per calibration batch: the first layer's hidden states and every layer's other arguments."""

    hidden_states: list[torch.Tensor] = field(default_factory=list)
    calls: list[list[LayerCall]] = field(default_factory=list)  # [layer][batch]
    returns_tuple: bool = False
    tuple_length: int = 1
    devices: dict[int, torch.device] = field(default_factory=dict)

    def call(self, hidden: torch.Tensor, layer: nn.Module, index: int, batch: int) -> torch.Tensor:
        """Run decoder layer ``index`` on ``hidden`` with the arguments captured for ``batch``."""
        recorded = self.calls[index][batch]
        device = self.devices.get(index)
        if device is None:
            device = self.devices[index] = execution_device(layer)
        output = layer(hidden.to(device), *recorded.args, **recorded.kwargs)
        return output[0] if isinstance(output, (tuple, list)) else output


class _LayerStandIn(nn.Module):
    def __init__(self, layer: nn.Module, index: int, capture: _Recorder):
        super().__init__()
        # Not registered as a submodule: the stand-in must not change the model's module tree.
        self.__dict__["_wrapped"] = layer
        self.__dict__["_index"] = index
        self.__dict__["_capture"] = capture

    def __getattr__(self, name: str):
        # Model code sometimes reads layer attributes in its loop (e.g. ``layer.attention_type``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_wrapped"], name)

    def forward(self, *args, **kwargs):
        return self.__dict__["_capture"].record(
            self.__dict__["_index"], self.__dict__["_wrapped"], args, kwargs
        )


class _Recorder:
    def __init__(self, num_layers: int, captured: CapturedInputs):
        self.num_layers = num_layers
        self.captured = captured
        self.output_kind_known = False
        # The first batch runs the whole forward pass through the stand-ins (no early stop) to count how often
        # each layer is called: a layer run twice (Dory's recurrent loop) would be replayed on wrong inputs.
        self.stop_at_last = False
        self.counts = [0] * num_layers

    def record(self, index: int, layer: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if index == 0:
            if not torch.isfinite(hidden).all():
                raise FloatingPointError("the embeddings produced NaN or infinite hidden states")
            self.captured.hidden_states.append(hidden.detach())
            if not self.output_kind_known:
                # Learn once what a real layer returns (tensor or tuple) to pass hidden states through alike.
                with torch.no_grad():
                    try:
                        output = layer(hidden, *rest, **kwargs)
                    except TypeError as error:
                        raise LayerReplayError(
                            f"decoder layer {type(layer).__name__} cannot be called with the hidden states as "
                            f"its first argument ({error}): its blocks carry more than one residual stream "
                            "(e.g. reversible layers), which the layer-by-layer walk does not replay"
                        ) from error
                self.captured.returns_tuple = isinstance(output, (tuple, list))
                self.captured.tuple_length = len(output) if self.captured.returns_tuple else 1
                self.output_kind_known = True
        self.counts[index] += 1
        if self.counts[index] == 1 or self.stop_at_last:
            self.captured.calls[index].append(LayerCall(rest, kwargs))
        if index == self.num_layers - 1 and self.stop_at_last:
            raise _StopForward
        if self.captured.returns_tuple:
            return (hidden,) + (None,) * (self.captured.tuple_length - 1)
        return hidden


def capture_layer_inputs(
    model: nn.Module,
    stack: DecoderStack,
    batches: list[dict[str, torch.Tensor]],
    input_device: torch.device,
) -> CapturedInputs:
    """Run ``model`` on each batch (``input_ids``, ``attention_mask``) and record every layer's call."""
    captured = CapturedInputs(calls=[[] for _ in stack.layers])
    recorder = _Recorder(len(stack.layers), captured)
    originals = list(stack.layers)
    try:
        for index, layer in enumerate(originals):
            stack.layers[index] = _LayerStandIn(layer, index, recorder)
        with torch.no_grad():
            for number, batch in enumerate(batches):
                recorder.stop_at_last = number > 0
                try:
                    model(
                        input_ids=batch["input_ids"].to(input_device),
                        attention_mask=batch["attention_mask"].to(input_device),
                        use_cache=False,
                    )
                except _StopForward:
                    pass
                else:
                    if number > 0:
                        raise RuntimeError(
                            "the model's forward pass did not reach its last decoder layer; cannot capture inputs"
                        )
                if number == 0:
                    _check_each_layer_ran_once(recorder.counts, stack)
    finally:
        for index, layer in enumerate(originals):
            stack.layers[index] = layer
    return captured


def _check_each_layer_ran_once(counts: list[int], stack: DecoderStack) -> None:
    odd = {stack.layer_name(i): n for i, n in enumerate(counts) if n != 1}
    if odd:
        raise LayerReuseError(
            "each decoder layer must run exactly once per forward pass to be pruned layer by layer, but "
            + ", ".join(f"{name} ran {n} times" for name, n in odd.items())
            + " (a looped or recurrent block, or a stack the forward pass does not walk in order)"
        )
