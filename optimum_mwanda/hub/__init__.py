"""Sparse checkpoints, model cards and Hub pushes for pruned models."""

from .atomic import CheckpointConflictError, FolderInUseError
from .card import create_model_card, plot_layer_sparsity
from .push import HubAuthenticationError, HubPermissionError, HubPushError, push_pruned_model
from .serialization import (
    build_sparsity_config,
    load_eval_results,
    load_pruned_model,
    rewrite_model_card,
    save_pruned_model,
)
from .verification import SparsityVerification, verify_sparsity

__all__ = [
    "CheckpointConflictError",
    "FolderInUseError",
    "HubAuthenticationError",
    "HubPermissionError",
    "HubPushError",
    "SparsityVerification",
    "build_sparsity_config",
    "create_model_card",
    "load_eval_results",
    "load_pruned_model",
    "plot_layer_sparsity",
    "push_pruned_model",
    "rewrite_model_card",
    "save_pruned_model",
    "verify_sparsity",
]
