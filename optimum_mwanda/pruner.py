"""The Pruner: validate, capture, (measure a layer schedule,) prune decoder layer by decoder layer, report.

Orchestration only. The maths lives in ``methods/`` (pure functions on tensors) and everything that knows
where a model keeps its layers and weights lives in ``modeling/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import distributed, preflight
from .calibration import CalibrationSet, resolve_calibration
from .configuration import PruningConfig
from .methods import algorithm_for
from .modeling import DecoderStack, PrunableLinear, SequentialWalk
from .modeling.adapters import check_adapters, prunable_base_linears
from .modeling.coverage import CoveragePlan, plan_coverage
from .modeling.experts import ExpertOptions
from .modeling.linear import find_expert_weights
from .parts.statistics import sequence_group_for
from .report import PruningReport
from .resume import ResumeCheckpoint, model_weights_digest, run_fingerprint

if TYPE_CHECKING:
    from .methods.base import PruningAlgorithm

logger = logging.getLogger(__name__)

#: the one tag of negative calibration text (Kim et al.), ISO 639 "multiple languages": its keys name kinds
#: of unwanted text ("code"), not languages, and its statistics are pooled anyway
NEGATIVE_LANGUAGE = "mul"


class Pruner:
    """Prunes a causal LM in place with the method its config names.

    Example::

        from optimum_mwanda import MWandaConfig, Pruner

        pruner = Pruner(MWandaConfig(sparsity=0.5))
        report = pruner.prune_model(model, {"en": en_texts, "sw": sw_texts}, tokenizer=tokenizer)
        pruner.save_pretrained(model, "pruned-model", tokenizer=tokenizer)

    Args:
        config: a :class:`WandaConfig`, :class:`SparseGPTConfig` or :class:`MWandaConfig`.
    """

    def __init__(self, config: PruningConfig):
        if not isinstance(config, PruningConfig) or type(config) is PruningConfig:
            raise TypeError(
                f"Pruner needs a WandaConfig, SparseGPTConfig or MWandaConfig, got {type(config).__name__}"
            )
        config.validate()
        #: the config as given; frozen (derive another with ``dataclasses.replace``), and validated again
        #: by :meth:`prune_model`, which prunes with :meth:`PruningConfig.resolve`'s explicit copy of it
        self.config = config
        self.report: PruningReport | None = None

    # ------------------------------------------------------------------------------------------------
    def prune_model(
        self,
        model: nn.Module,
        calibration: CalibrationSet | Mapping[str, Any] | None = None,
        tokenizer=None,
        negative_calibration: CalibrationSet | Mapping[str, Any] | Sequence[str] | None = None,
        show_progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        activations_device: str | torch.device | None = None,
        activations_max_memory: int | str | None = None,
        allow_unpruned: bool = False,
        experts: ExpertOptions | None = None,
        statistics_dtype: torch.dtype | str = torch.float64,
        offload_statistics: bool = False,
        memory_budget: int | None = None,
    ) -> PruningReport:
        """Prune ``model`` in place and return a :class:`PruningReport` (also kept as ``self.report``).

        Args:
            model: a causal LM (``AutoModelForCausalLM.from_pretrained``), in memory or dispatched by
                Accelerate (multi-device, CPU or disk offload).
            calibration: ``{language: LongTensor[n, seq_len]}`` of token ids, ``{language: list[str]}`` of
                texts (needs ``tokenizer``; packed into ``config.samples_per_language`` sequences of
                ``config.calibration_seq_len`` tokens per language, seeded), or a :class:`CalibrationSet`.
                ``None`` uses the bundled multilingual sample corpus (needs ``tokenizer``).
            tokenizer: the model's tokenizer, needed for text calibration.
            negative_calibration: text (or token ids) whose activations should *lower* importance (Kim et
                al.), e.g. code. Wanda and M-Wanda only.
            show_progress: show tqdm progress bars.
            checkpoint_dir: the resume checkpoint: persist progress there after every decoder layer (pruned
                weights, the next layer's inputs, the layer schedule), durably and with checksums. A run
                killed at any point and started again with the same arguments on a freshly loaded model
                resumes at the first unfinished layer and produces the same weights as an uninterrupted run;
                a folder of another run or model, or a damaged file, raises a ``CheckpointError`` first, and
                a folder another run is using a ``FolderInUseError``. Only files with the resume
                checkpoint's own names are written or deleted there (see ``optimum_mwanda.resume``).
            activations_device: where calibration activations wait between layers (e.g. ``"cpu"`` to keep
                them off the accelerator); ``None`` leaves them where they were produced.
            activations_max_memory: bytes of activations kept in memory, as an int or a size string
                (``"8GB"``, ``"8GiB"``, ``"512MB"``); further batches are spilled to a temporary folder on
                disk (``None``: no limit).
            statistics_dtype: dtype of the ``in x in`` Hessian sums of SparseGPT and M-Wanda's sweep.
                ``torch.float64`` (default) adds the float32 ``X^T X`` of each group of consecutive sequences
                in float64, so results do not depend on batching or data-parallel sharding. ``torch.float32`` (or ``"float32"``)
                halves their memory (1.6 to 0.8 GB for an 8B ``down_proj``) and turns the sum into ``H`` in
                place; results still do not depend on the batch size, but a data-parallel run differs from
                one process at float32 rounding. Other methods keep small float64 sums either way.
            offload_statistics: keep each layer's statistics on the CPU between their accumulation and
                their group's update, so that only one group's ``H`` is on the device at a time.
            memory_budget: bytes the run may use on its device beyond what is already allocated. ``None``:
                on CUDA the device's free memory (``torch.cuda.mem_get_info``), on CPU no check. When the
                predicted peak (:mod:`optimum_mwanda.memory`) exceeds it, an
                :class:`~optimum_mwanda.memory.InsufficientMemoryError` naming the options that would make
                it fit is raised before any weight changes.
            allow_unpruned: leave dense, with a warning and a report entry, the decoder-layer weights that the
                method cannot reach (e.g. expert tensors of an unsupported experts class); without it such a
                weight is an ``IncompleteCoverageError`` before anything changes. ``report.coverage`` lists
                every weight pruned and every >= 2-D parameter left dense, with the reason.
            experts: how mixture-of-experts layers are calibrated (:class:`ExpertOptions`: router-weighted
                statistics, every expert on every token, the per-expert token threshold).

        Every input is validated before any weight is touched: the calibration data and token ids, the
        modules to prune (``ignore`` patterns must each match a module; ``N:M`` needs input widths divisible
        by ``M``; M-Wanda's ``compensation_rank`` is at most the smallest input width of the pruned
        modules), ``checkpoint_dir`` (writable), and every weight of the model (loaded, finite). A peft
        (LoRA) model has its base weights pruned, never the adapters, and is refused when its adapters are
        trained or merged. In a data-parallel run all ranks agree on the outcome before any work: a rank
        that fails validation raises its error, every other rank an error naming it. If pruning fails
        part-way, the weights already changed are restored before the exception propagates.
        """
        start = time.perf_counter()
        context = distributed.current_context()

        # 1. Validate everything before touching the model. Data-parallel: every rank reaches the agreement
        # with its verdict (its run's fingerprint, or its error), so a rank that fails here cannot leave
        # the others waiting in a collective; all ranks raise, the failing one its own error.
        try:
            run = self._validate(
                model,
                calibration,
                tokenizer,
                negative_calibration,
                checkpoint_dir,
                activations_max_memory,
                context,
                allow_unpruned,
                experts,
                memory_options={
                    "statistics_dtype": statistics_dtype,
                    "offload_statistics": offload_statistics,
                    "activations_device": activations_device,
                    "memory_budget": memory_budget,
                },
            )
        except Exception as error:
            if not context.enabled:
                raise
            distributed.agree_on_run(None, error=error, context=context)
            raise
        if context.enabled:
            # Every rank must hold the same model, config and calibration, and checkpoint or not alike.
            distributed.agree_on_run(
                run.fingerprint,  # holds the one weight digest (every parameter's bytes)
                checkpointed=checkpoint_dir is not None,
                context=context,
            )
        # 2-4. Capture, schedule, then statistics -> prune -> propagate, layer by layer, with the resolved
        # config (what runs is what the report records).
        walk = SequentialWalk(
            model,
            run.stack,
            run.layer_modules,
            run.algorithm,
            checkpoint=run.checkpoint,
            activations_device=activations_device,
            activations_max_memory=run.activations_max_memory,
            show_progress=show_progress and context.is_main,
            offload_statistics=offload_statistics,
            expert_options=run.expert_options,
        )
        # The resume checkpoint holds its folder's lock for the whole run.
        with run.checkpoint if run.checkpoint is not None else contextlib.nullcontext():
            result = walk.run(run.calibration, run.negative)

        # 5. Report.
        self.report = _build_report(model, run, result, total_seconds=time.perf_counter() - start)
        return self.report

    def _validate(
        self,
        model: nn.Module,
        calibration: Any,
        tokenizer: Any,
        negative_calibration: Any,
        checkpoint_dir: str | os.PathLike | None,
        activations_max_memory: int | str | None,
        context: distributed.DistributedContext,
        allow_unpruned: bool = False,
        experts: ExpertOptions | None = None,
        memory_options: dict[str, Any] | None = None,
    ) -> _ValidatedRun:
        """Every check that can fail, in the order a user would fix them; nothing is changed or written."""
        config = self.config
        if not isinstance(config, PruningConfig) or type(config) is PruningConfig:
            raise TypeError(f"Pruner.config must be a method's PruningConfig, got {type(config).__name__}")
        config.validate()  # configs are frozen; this catches one changed by force (object.__setattr__)
        if not isinstance(allow_unpruned, bool):
            raise TypeError("allow_unpruned must be a boolean")
        expert_options = experts if experts is not None else ExpertOptions()
        if not isinstance(expert_options, ExpertOptions):
            raise TypeError(f"experts must be an ExpertOptions, got {type(experts).__name__}")
        algorithm = algorithm_for(config.resolve())
        preflight.check_weights_loaded(model)
        max_memory = preflight.parse_memory_size(activations_max_memory, "activations_max_memory")
        packing = {
            "samples_per_language": config.samples_per_language,
            "seq_len": config.calibration_seq_len,
            "seed": config.seed,
        }
        calibration_set = resolve_calibration(calibration, tokenizer, what="calibration", **packing)
        negative_set = None
        if negative_calibration is not None:
            if not algorithm.supports_negative_calibration:
                raise ValueError(
                    "negative_calibration lowers feature importance in a Wanda-style score: it is supported "
                    'by WandaConfig and MWandaConfig with weight_update="closed_form", not '
                    f"{type(config).__name__}" + f' (weight_update="{algorithm.weight_update().name}")'
                )
            negative_set = resolve_calibration(
                _pooled_negative(negative_calibration), tokenizer, what="negative_calibration", **packing
            )
        check_adapters(model)  # a peft model: its base weights are pruned, never the adapters
        stack, layer_modules, coverage = validate_structure(model, config, allow_unpruned)
        # Every automatic choice made, from the run's size too: what runs is what the report records.
        calibration_tokens = sum(calibration_set.token_counts.values())
        config = config.resolve(calibration_tokens, [m.in_features for ms in layer_modules for m in ms])
        algorithm = algorithm_for(config)
        algorithm.calibration_tokens = calibration_tokens
        algorithm.sequence_group = sequence_group_for(calibration_set.input_ids.shape[0])
        _validate_token_ids(model, calibration_set, negative_set)
        # Whether the run fits on its device (statistics dtype, offloading, the predicted peak).
        memory_options = dict(memory_options or {})
        algorithm.statistics_dtype = _statistics_dtype(memory_options.pop("statistics_dtype", torch.float64))
        _check_memory(
            model, config, layer_modules, calibration_set, algorithm.statistics_dtype, **memory_options
        )
        if checkpoint_dir is not None and context.is_main:  # only rank 0 writes there
            preflight.check_writable_folder(checkpoint_dir, "checkpoint_dir")
        preflight.check_finite_weights(model)
        fingerprint = ""
        if checkpoint_dir is not None or context.enabled:
            fingerprint = _fingerprint(
                config, model, layer_modules, calibration_set, negative_set, expert_options, allow_unpruned
            )
        checkpoint = ResumeCheckpoint(checkpoint_dir, fingerprint) if checkpoint_dir is not None else None
        return _ValidatedRun(
            config,
            algorithm,
            stack,
            layer_modules,
            calibration_set,
            negative_set,
            fingerprint,
            max_memory,
            checkpoint,
            coverage,
            expert_options,
        )

    # -- Hub integration (implemented in optimum_mwanda.hub) ------------------------------------------
    def _require_report(self) -> PruningReport:
        if self.report is None:
            raise RuntimeError("no pruning report yet: call prune_model(...) before saving or pushing")
        return self.report

    def save_pretrained(
        self,
        model: nn.Module,
        save_directory: str | os.PathLike,
        tokenizer=None,
        compressed: bool = False,
        eval_results: dict[str, dict[str, float]] | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ):
        """Save the pruned ``model`` as a transformers checkpoint with ``sparsity_config`` in ``config.json``,
        ``pruning_report.json``, ``eval_results.json`` (when given) and a model card, crash-consistently and
        keeping every file in the folder that optimum-mwanda did not write (see
        :func:`optimum_mwanda.hub.save_pruned_model`, also for ``overwrite=True``). ``compressed=True`` writes
        the bitmask-packed sparse format that :func:`optimum_mwanda.load_pruned_model` restores. Returns the
        folder path. The folder and its parent must be writable (``PermissionError`` otherwise); to know
        before pruning, call ``optimum_mwanda.preflight.check_writable_folder(path, "save_directory",
        staged_beside=True)`` first.
        """
        from .hub import save_pruned_model

        # The save stages its files beside the folder: an unwritable parent fails here, named, not midway.
        preflight.check_writable_folder(save_directory, "save_directory", staged_beside=True)
        return save_pruned_model(
            model,
            save_directory,
            self._require_report(),
            tokenizer=tokenizer,
            compressed=compressed,
            eval_results=eval_results,
            base_model=base_model,
            **kwargs,
        )

    def create_model_card(
        self,
        base_model: str | None = None,
        eval_results: dict[str, dict[str, float]] | None = None,
        **kwargs: Any,
    ):
        """The ``huggingface_hub.ModelCard`` of the last pruning run, without pushing anything.

        ``eval_results`` is ``{"before": {language: perplexity}, "after": {language: perplexity}}``.
        """
        from .hub import create_model_card

        return create_model_card(
            self._require_report(),
            base_model=base_model,
            eval_results=eval_results,
            **kwargs,
        )

    def push_to_hub(
        self,
        model: nn.Module,
        repo_id: str,
        tokenizer=None,
        eval_results: dict[str, dict[str, float]] | None = None,
        private: bool = False,
        token: str | None = None,
        commit_message: str | None = None,
        base_model: str | None = None,
        **kwargs: Any,
    ):
        """Create ``repo_id`` if needed and upload weights, config, tokenizer, card and plot in one commit,
        retrying transient failures. Returns the commit info."""
        from .hub import push_pruned_model

        return push_pruned_model(
            model,
            repo_id,
            self._require_report(),
            tokenizer=tokenizer,
            eval_results=eval_results,
            private=private,
            token=token,
            commit_message=commit_message,
            base_model=base_model,
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------------
@dataclass
class _ValidatedRun:
    """What the validation phase resolved, for the walk."""

    config: PruningConfig
    algorithm: PruningAlgorithm
    stack: DecoderStack
    layer_modules: list[list[PrunableLinear]]
    calibration: CalibrationSet
    negative: CalibrationSet | None
    fingerprint: str
    activations_max_memory: int | None
    checkpoint: ResumeCheckpoint | None
    coverage: CoveragePlan
    expert_options: ExpertOptions


def _fingerprint(
    config, model, layer_modules, calibration_set, negative_set, expert_options=None, allow_unpruned=False
) -> str:
    config_data = {k: v for k, v in config.to_dict().items() if k != "optimum_mwanda_version"}
    tensors = [calibration_set.input_ids, calibration_set.attention_mask, calibration_set.language_index]
    if negative_set is not None:
        tensors += [negative_set.input_ids, negative_set.attention_mask]
    layout = {
        "architecture": type(model).__name__,
        "languages": calibration_set.language_list,
        "modules": [[m.name, list(m.shape)] for modules in layer_modules for m in modules],
        "weights": model_weights_digest(model),  # as loaded: called before any weight changes
    }
    if any(not isinstance(m, PrunableLinear) for modules in layer_modules for m in modules):
        layout["experts"] = expert_options.to_dict() if expert_options is not None else None
    if allow_unpruned:
        layout["allow_unpruned"] = True
    return run_fingerprint(config_data, tensors, layout)


def _pooled_negative(negative: Any) -> Any:
    """Negative calibration under the one tag :data:`NEGATIVE_LANGUAGE` (a ready CalibrationSet is kept)."""
    if isinstance(negative, (list, tuple)):
        return {NEGATIVE_LANGUAGE: list(negative)}
    if isinstance(negative, CalibrationSet) or not isinstance(negative, Mapping) or not negative:
        return negative  # resolve_calibration says what is wrong with anything else
    values = list(negative.values())
    if all(isinstance(v, torch.Tensor) for v in values):
        tensors = [v.unsqueeze(0) if v.dim() == 1 else v for v in values]
        if any(t.dim() != 2 for t in tensors) or len({t.shape[1] for t in tensors}) > 1:
            raise ValueError("negative_calibration tensors must all be [n, seq_len] with the same seq_len")
        return {NEGATIVE_LANGUAGE: torch.cat(tensors)}
    if all(
        isinstance(v, str) or (isinstance(v, Sequence) and all(isinstance(t, str) for t in v)) for v in values
    ):
        return {NEGATIVE_LANGUAGE: [t for v in values for t in ([v] if isinstance(v, str) else v)]}
    return negative


def validate_structure(
    model: nn.Module, config: PruningConfig, allow_unpruned: bool = False
) -> tuple[DecoderStack, list[list[PrunableLinear]], CoveragePlan]:
    """The decoder stack of ``model``, the weights ``config`` prunes in each layer (linear modules, then
    every expert's matrices of fused expert tensors) and the coverage plan of every >= 2-D parameter of the
    decoder layers, refused when the config cannot apply to them (an ``ignore`` pattern matching nothing,
    no module left, an ``N:M`` the input widths cannot hold, a ``compensation_rank`` beyond them) or when a
    decoder-layer weight cannot be reached (``IncompleteCoverageError`` unless ``allow_unpruned``). Reads no
    weight values, so the command line runs it on a weightless (``meta``) copy of the model before loading
    it."""
    stack, layer_modules = prunable_base_linears(model, config.ignore)
    for index, layer in enumerate(stack.layers):
        layer_modules[index] += find_expert_weights(layer, stack.layer_name(index), list(config.ignore))
    coverage = plan_coverage(stack, layer_modules, list(config.ignore))
    coverage.enforce(allow_unpruned)
    logger.info(
        "Coverage: %d decoder-layer weights to prune; left dense: %s",
        len(coverage.pruned),
        ", ".join(f"{n} {reason}" for reason, n in coverage.reasons().items()) or "none",
    )
    preflight.check_ignore_patterns(model, config.ignore)
    _validate_modules(layer_modules, config)
    return stack, layer_modules, coverage


def _validate_modules(layer_modules: list[list[PrunableLinear]], config: PruningConfig) -> None:
    """Structural checks on the modules to prune (the CLI runs them on a weightless copy of the model)."""
    if not any(layer_modules):
        raise ValueError("no prunable linear modules found in the decoder layers (check config.ignore)")
    preflight.check_nm_structure(layer_modules, config.nm_structure, config.mask_structure)
    # An explicit closed-form rank only: the default (None) is capped at each module's width.
    preflight.check_compensation_rank(
        layer_modules, getattr(getattr(config, "weight_update", None), "rank", None)
    )


def _validate_token_ids(model: nn.Module, *sets: CalibrationSet | None) -> None:
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    max_positions = preflight.position_limit(getattr(model, "config", None))
    for calibration_set in sets:
        if calibration_set is None:
            continue
        ids = calibration_set.input_ids
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(
                f"calibration token ids must lie in [0, {vocab}) for this model, found range "
                f"[{int(ids.min())}, {int(ids.max())}]: was it tokenized with another tokenizer?"
            )
        if max_positions is not None and calibration_set.seq_len > max_positions:
            raise ValueError(
                f"calibration sequences have {calibration_set.seq_len} tokens but this model takes at most "
                f"{max_positions} positions: lower calibration_seq_len (or pass shorter token ids)"
            )


def _statistics_dtype(value: torch.dtype | str) -> torch.dtype:
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"statistics_dtype must be torch.float32 or torch.float64, got {value!r}")
    return dtype


def _check_memory(
    model: nn.Module,
    config: PruningConfig,
    layer_modules: list[list[PrunableLinear]],
    calibration_set: CalibrationSet,
    statistics_dtype: torch.dtype,
    offload_statistics: bool,
    activations_device: str | torch.device | None,
    memory_budget: int | None,
) -> None:
    """Refuse a run whose predicted peak on the device of its largest layer exceeds ``memory_budget`` (on
    CUDA by default the device's free memory), before anything changes; the error names the options that
    lower the peak."""
    from . import memory

    if memory_budget is not None and (isinstance(memory_budget, bool) or memory_budget < 0):
        raise ValueError(f"memory_budget must be a number of bytes >= 0, got {memory_budget!r}")
    largest = max(layer_modules, key=lambda modules: sum(m.in_features * m.shape[0] for m in modules))
    device = largest[0].device
    if memory_budget is None:
        if device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(device)
        memory_budget = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    # The parameter itself (on "meta" when offloaded; its dtype is the real one); experts name theirs.
    weight = getattr(largest[0].module, getattr(largest[0], "parameter", "weight"))
    resident = weight.device == device
    spec = memory.MethodSpec.from_config(
        config,
        languages=len(calibration_set.language_list),
        statistics_bytes=torch.empty((), dtype=statistics_dtype).element_size(),
    )
    groups = memory.groups_of_modules((m.name, m.in_features, m.shape[0]) for m in largest)
    try:
        shape = memory.LayerShape.from_config(model.config)
    except AttributeError:  # no transformers config: the widest input stands for both widths
        widest = max(g.in_features for g in groups)
        shape = memory.LayerShape(hidden=widest, intermediate=widest, heads=1, kv_heads=1)
    tokens = calibration_set.input_ids.numel()
    on_device = activations_device is None or torch.device(activations_device) == device
    peak = memory.run_peak(
        spec,
        shape,
        tokens,
        config.batch_size * calibration_set.seq_len,
        weight_bytes=weight.element_size(),
        activation_bytes=weight.element_size(),
        offload_statistics=offload_statistics,
        activations_on_device=on_device,
        groups=groups,
    )
    # Weights already on the device are already allocated.
    needed = peak.total - (sum(g.params for g in groups) * weight.element_size() if resident else 0)
    options = []
    if spec.sweep and spec.statistics_bytes == 8:
        options.append('statistics_dtype="float32"')
    if spec.sweep and not offload_statistics:
        options.append("offload_statistics=True")
    if on_device:
        options.append('activations_device="cpu"')
    if config.batch_size > 1:
        options.append("a smaller batch_size")
    memory.check_fits(int(needed), int(memory_budget), f"pruning with {spec.method} on {device}", options)


def _build_report(model: nn.Module, run, result, total_seconds: float) -> PruningReport:
    """The :class:`PruningReport` of a finished walk: the resolved config, what was pruned, where and how."""
    timings = dict(result.timings, total=total_seconds)
    return PruningReport(
        method=run.config.method,
        config=run.config,
        target_sparsity=run.config.sparsity,
        layer_sparsity=result.layer_sparsity,
        module_sparsity=result.module_sparsity,
        module_shapes=result.module_shapes,
        languages=run.calibration.language_list,
        token_counts=run.calibration.token_counts,
        timings=timings,
        layerwise_signal=result.layerwise_signal,
        calibration_sources=dict(run.calibration.sources),
        calibration_settings=run.calibration.settings,
        architecture=type(model).__name__,
        base_model=str(getattr(model, "name_or_path", "") or ""),
        negative_calibration_tokens=sum(run.negative.token_counts.values()) if run.negative else 0,
        resumed_from_layer=result.resumed_from_layer,
        coverage=run.coverage,
        experts=result.experts,
        expert_options=run.expert_options.to_dict() if result.experts else {},
        magnitude_pruned=result.magnitude_pruned,
    )
