"""Where the model is: decoder layers, prunable linear modules, captured inputs, hooks, offloaded weights."""

from .activations import ActivationStore
from .capture import CapturedInputs, capture_layer_inputs
from .decoder import DecoderStack, NoDecoderLayersError, find_decoder_stack
from .hooks import LayerStatisticsCollector
from .linear import PrunableLinear, find_prunable_linears
from .offload import execution_device, read_parameter, write_parameter

__all__ = [
    "ActivationStore",
    "CapturedInputs",
    "DecoderStack",
    "LayerStatisticsCollector",
    "NoDecoderLayersError",
    "PrunableLinear",
    "capture_layer_inputs",
    "execution_device",
    "find_decoder_stack",
    "find_prunable_linears",
    "read_parameter",
    "write_parameter",
]
