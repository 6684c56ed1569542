"""Where the model is: decoder layers, prunable linear modules, captured inputs, hooks, offloaded weights,
and the sequential walk that prunes layer by layer (:class:`SequentialWalk`)."""

from .activations import ActivationStore
from .capture import CapturedInputs, LayerReplayError, LayerReuseError, capture_layer_inputs
from .coverage import CoverageEntry, CoveragePlan, IncompleteCoverageError, plan_coverage
from .decoder import DecoderStack, NoDecoderLayersError, find_decoder_stack
from .experts import ExpertOptions, ExpertWeight, FusedExperts, find_fused_experts
from .hooks import LayerStatisticsCollector
from .linear import (
    PrunableLinear,
    find_prunable_linears,
    prunable_linears_by_layer,
    prunable_weights_by_layer,
)
from .offload import execution_device, input_device, read_parameter, write_parameter
from .walk import ProgressListener, SequentialWalk, WalkProgress, WalkResult

__all__ = [
    "ActivationStore",
    "CapturedInputs",
    "CoverageEntry",
    "CoveragePlan",
    "ExpertOptions",
    "ExpertWeight",
    "FusedExperts",
    "IncompleteCoverageError",
    "DecoderStack",
    "LayerReplayError",
    "LayerReuseError",
    "LayerStatisticsCollector",
    "NoDecoderLayersError",
    "PrunableLinear",
    "ProgressListener",
    "SequentialWalk",
    "WalkProgress",
    "WalkResult",
    "capture_layer_inputs",
    "execution_device",
    "find_decoder_stack",
    "find_fused_experts",
    "plan_coverage",
    "prunable_weights_by_layer",
    "find_prunable_linears",
    "input_device",
    "prunable_linears_by_layer",
    "read_parameter",
    "write_parameter",
]
