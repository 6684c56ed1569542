"""The Pruner: validate, capture, (measure a layer schedule,) prune decoder layer by decoder layer, report.

Orchestration only. The maths lives in ``methods/`` (pure functions on tensors) and everything that knows
where a model keeps its layers and weights lives in ``modeling/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationSet, build_calibration
from .configuration import MWandaConfig, PruningConfig, SparseGPTConfig, WandaConfig
from .distributed import (
    barrier,
    check_same_run,
    current_context,
    local_indices,
    synchronise_collector,
    synchronise_weights,
    weights_digest,
)
from .methods import (
    FeatureStatistics,
    HessianStatistics,
    cross_lingual_correlation,
    cwl_schedule,
    depth_schedule,
    mask_from_scores,
    mean_shift_compensation,
    mwanda_feature_importance,
    negative_feature_factor,
    outlier_ratio,
    owl_schedule,
    sparsegpt_prune_group,
    wanda_scores,
)
from .methods.layerwise import uniform_schedule
from .modeling import (
    ActivationStore,
    CapturedInputs,
    LayerStatisticsCollector,
    PrunableLinear,
    capture_layer_inputs,
    execution_device,
    find_decoder_stack,
    find_prunable_linears,
)
from .report import PruningReport
from .resume import PruningCheckpoint, ResumeState, run_fingerprint

logger = logging.getLogger(__name__)

NEGATIVE_LANGUAGE = "__negative__"


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
        activations_max_memory: int | None = None,
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
            checkpoint_dir: persist progress there after every decoder layer (pruned weights, the next
                layer's inputs, the layer schedule). A run killed part-way and started again with the same
                arguments on a freshly loaded model resumes at the first unfinished layer and produces the
                same masks as an uninterrupted run.
            activations_device: where calibration activations wait between layers (e.g. ``"cpu"`` to keep
                them off the accelerator); ``None`` leaves them where they were produced.
            activations_max_memory: bytes of activations kept in memory; further batches are spilled to a
                temporary folder on disk (``None``: no limit).

        Every input is validated before any weight is touched; if pruning fails part-way, the weights
        already changed are restored before the exception propagates.
        """
        config = self.config
        timings: dict[str, float] = {}
        start = time.perf_counter()

        # 1. Validate everything before touching the model.
        calibration_set = _as_calibration_set(calibration, tokenizer, config, what="calibration")
        negative_set = None
        if negative_calibration is not None:
            if isinstance(config, SparseGPTConfig):
                raise ValueError("negative_calibration is supported by Wanda and M-Wanda, not SparseGPT")
            if isinstance(negative_calibration, (list, tuple)):
                negative_calibration = {NEGATIVE_LANGUAGE: list(negative_calibration)}
            negative_set = _as_calibration_set(
                negative_calibration, tokenizer, config, what="negative_calibration"
            )
        stack = find_decoder_stack(model)
        layer_modules = [
            find_prunable_linears(layer, stack.layer_name(i), config.ignore)
            for i, layer in enumerate(stack.layers)
        ]
        _validate_modules(layer_modules, config)
        _validate_token_ids(model, calibration_set, negative_set)
        context = current_context()
        fingerprint = ""
        if checkpoint_dir is not None or context.enabled:
            fingerprint = _fingerprint(config, model, layer_modules, calibration_set, negative_set)
        # Data-parallel: every rank must hold the same model, config and calibration (refused otherwise).
        check_same_run(f"{fingerprint}:{weights_digest(model)}" if context.enabled else "", context)
        show_progress = show_progress and context.is_main
        checkpoint, resume = None, None
        if checkpoint_dir is not None:
            checkpoint = PruningCheckpoint(checkpoint_dir, fingerprint)
            resume = checkpoint.load_state()
            barrier(context)  # every rank has read the state before rank 0 writes a new one

        # 2. Capture what each decoder layer is called with.
        was_training = model.training
        model.eval()
        t = time.perf_counter()
        languages = calibration_set.language_list
        # Each rank captures and propagates its own shard of every set (all of it in a single process).
        batches = _batches(calibration_set, config.batch_size, context)
        negative_batches = (
            _batches(negative_set, config.batch_size, context) if negative_set is not None else []
        )
        signal_batches: list[dict[str, torch.Tensor]] = []
        if config.layerwise in ("owl", "cwl"):  # schedules that measure a signal
            signal_batches = _batches(_signal_subset(calibration_set, config), config.batch_size, context)
        input_device = execution_device(model.get_input_embeddings())
        captured = capture_layer_inputs(
            model, stack, batches + negative_batches + signal_batches, input_device
        )
        timings["capture"] = time.perf_counter() - t

        n_main, n_negative = len(batches), len(negative_batches)
        all_batches = batches + negative_batches
        param_counts = [sum(m.shape[0] * m.shape[1] for m in modules) or 1 for modules in layer_modules]

        # 3. Per-layer sparsity: uniform, or from a dense pass measuring the schedule's signal.
        signal: list[float] = []
        if resume is not None and resume.layer_sparsity:
            layer_sparsity, signal = list(resume.layer_sparsity), list(resume.layerwise_signal)
        elif config.layerwise == "uniform":
            layer_sparsity = uniform_schedule(len(stack.layers), config.sparsity)
        elif config.layerwise == "depth":
            layer_sparsity = depth_schedule(param_counts, config.sparsity, config.layerwise_range)
        else:
            t = time.perf_counter()
            signal = self._measure_layer_signal(
                stack,
                layer_modules,
                captured,
                signal_batches,
                n_main + n_negative,
                len(languages),
                show_progress,
            )
            if config.layerwise == "owl":
                layer_sparsity = owl_schedule(signal, param_counts, config.sparsity, config.layerwise_range)
            else:
                assert isinstance(config, MWandaConfig)
                layer_sparsity = cwl_schedule(
                    signal, param_counts, config.sparsity, config.layerwise_range, config.cwl_protect
                )
            timings["layerwise_signal"] = time.perf_counter() - t

        # 4. Sequential walk: statistics -> prune -> propagate, layer by layer.
        hidden = ActivationStore(
            captured.hidden_states[: len(all_batches)], activations_device, activations_max_memory
        )
        captured.hidden_states.clear()  # the store holds the only copy now
        originals: dict[str, tuple[PrunableLinear, torch.Tensor]] = {}
        state = resume or ResumeState(fingerprint=checkpoint.fingerprint if checkpoint else "")
        state.layer_sparsity, state.layerwise_signal = list(layer_sparsity), list(signal)
        module_sparsity, module_shapes = state.module_sparsity, state.module_shapes
        first_layer = state.completed_layers
        timings.update(statistics=0.0, pruning=0.0, propagation=0.0)
        try:
            if first_layer:
                # Resume: re-apply the finished layers' pruned weights and reload the next layer's inputs.
                for index in range(first_layer):
                    saved = checkpoint.load_layer(index)
                    for module in layer_modules[index]:
                        weight = module.read_weight()
                        originals[module.name] = (module, weight.detach().to("cpu", copy=True))
                        module.write_weight(saved[module.name].to(weight.dtype))
                if first_layer < len(stack.layers):
                    if not context.enabled and resume is not None and resume.hidden_saved:
                        for b, tensor in enumerate(checkpoint.load_hidden()):
                            hidden[b] = tensor
                    else:  # no saved inputs (a data-parallel run): rerun the finished, pruned layers
                        with torch.no_grad():
                            for index in range(first_layer):
                                for b in range(len(all_batches)):
                                    hidden[b] = captured.call(hidden[b], stack.layers[index], index, b)
            elif checkpoint is not None:
                checkpoint.save_progress(state, None)  # the schedule, so a resume skips the signal pass
            progress = tqdm(
                list(enumerate(stack.layers))[first_layer:],
                initial=first_layer,
                total=len(stack.layers),
                desc=f"Pruning ({config.method})",
                unit="layer",
                disable=not show_progress,
            )
            for index, layer in progress:
                modules = layer_modules[index]
                pruned_layer: dict[str, torch.Tensor] = {}
                if modules:
                    t = time.perf_counter()
                    collector = self._new_collector(
                        modules, len(languages), negative=negative_set is not None
                    )
                    with collector.attached(), torch.no_grad():
                        for b, batch in enumerate(all_batches):
                            collector.set_batch(
                                batch["attention_mask"], batch["language"], negative=b >= n_main
                            )
                            collector.run(captured.call, hidden[b], layer, index, b)
                            collector.end_batch()
                    synchronise_collector(collector, context)  # sums over all ranks' shards
                    timings["statistics"] += time.perf_counter() - t

                    t = time.perf_counter()
                    for group in collector.groups:
                        weights = [module.read_weight() for module in group]
                        for module, weight in zip(group, weights):
                            originals[module.name] = (module, weight.detach().to("cpu", copy=True))
                        new_weights = self._prune_group(group, weights, collector, layer_sparsity[index])
                        synchronise_weights(new_weights, context)
                        for module, weight, new_weight in zip(group, weights, new_weights):
                            module.write_weight(new_weight.to(weight.dtype))
                            pruned_layer[module.name] = new_weight.to(weight.dtype)
                            module_sparsity[module.name] = float((new_weight == 0).float().mean())
                            module_shapes[module.name] = list(module.shape)
                    timings["pruning"] += time.perf_counter() - t
                    if checkpoint is not None:
                        checkpoint.save_layer(index, pruned_layer)

                if index == len(stack.layers) - 1:
                    if checkpoint is not None:
                        state.completed_layers = index + 1
                        checkpoint.save_progress(state, None)
                    break  # nothing reads the last layer's outputs
                t = time.perf_counter()
                with torch.no_grad():
                    for b in range(len(all_batches)):
                        hidden[b] = captured.call(hidden[b], layer, index, b)
                        if not torch.isfinite(hidden[b]).all():
                            raise FloatingPointError(
                                f"decoder layer {index} produced NaN or infinite hidden states after pruning"
                            )
                timings["propagation"] += time.perf_counter() - t
                if checkpoint is not None:
                    state.completed_layers = index + 1
                    # A rank holds only its shard's hidden states: data-parallel resumes recompute them.
                    checkpoint.save_progress(state, None if context.enabled else hidden.as_list())
        except BaseException:
            # Leave the model as it was: restore every weight already changed.
            for module, weight in originals.values():
                module.write_weight(weight)
            raise
        finally:
            hidden.close()
            model.train(was_training)

        timings["total"] = time.perf_counter() - start
        self.report = PruningReport(
            method=config.method,
            config=config.to_dict(),
            target_sparsity=config.sparsity,
            layer_sparsity=[float(s) for s in layer_sparsity],
            module_sparsity=module_sparsity,
            module_shapes=module_shapes,
            languages=languages,
            token_counts=calibration_set.token_counts,
            timings=timings,
            layerwise_signal=signal,
            calibration_sources=dict(calibration_set.sources),
            architecture=type(model).__name__,
            base_model=str(getattr(model, "name_or_path", "") or ""),
            negative_calibration_tokens=sum(negative_set.token_counts.values())
            if negative_set is not None
            else 0,
            resumed_from_layer=first_layer,
        )
        return self.report

    # ------------------------------------------------------------------------------------------------
    def _new_collector(self, modules: list[PrunableLinear], num_languages: int, negative: bool):
        config = self.config
        if isinstance(config, SparseGPTConfig):

            def factory(in_features, device):
                return HessianStatistics(in_features, num_languages, device=device)

        else:
            track = isinstance(config, MWandaConfig) and config.activation_probability_weight > 0
            threshold = config.activation_threshold if isinstance(config, MWandaConfig) else 1.0
            track_mean = isinstance(config, MWandaConfig) and config.mean_compensation != "none"

            def factory(in_features, device):
                return FeatureStatistics(
                    in_features,
                    num_languages,
                    device=device,
                    track_activation=track,
                    activation_threshold=threshold,
                    track_mean=track_mean,
                )

        def negative_factory(in_features, device):
            return FeatureStatistics(in_features, 1, device=device)

        return LayerStatisticsCollector(modules, factory, negative_factory if negative else None)

    def _prune_group(
        self,
        group: list[PrunableLinear],
        weights: list[torch.Tensor],
        collector: LayerStatisticsCollector,
        sparsity: float,
    ) -> list[torch.Tensor]:
        """New float32 weights for modules that read the same input (and so share one statistic)."""
        config = self.config
        statistic = collector.statistic_for(group[0])
        if isinstance(config, SparseGPTConfig):
            device = statistic.hessian.device
            new_weights, _ = sparsegpt_prune_group(
                [w.to(device) for w in weights],
                statistic.hessian,
                sparsity,
                nm=config.nm_structure,
                block_size=config.block_size,
                dampening=config.dampening,
            )
            return new_weights
        importance = self._feature_importance(group[0], statistic, collector)
        compensation = config.mean_compensation if isinstance(config, MWandaConfig) else "none"
        if compensation == "language":
            moments = (statistic.language_means, statistic.language_second_moments, statistic.language_shares)
        elif compensation == "pooled":
            moments = (statistic.pooled_mean, statistic.pooled_second_moment, torch.ones(1))
        pruned = []
        for weight in weights:
            weight = weight.to(importance.device).float()
            mask = mask_from_scores(wanda_scores(weight, importance), sparsity, config.nm_structure)
            if compensation == "none":
                pruned.append(weight.masked_fill(mask, 0.0))
            else:
                pruned.append(mean_shift_compensation(weight, mask, *moments))
        return pruned

    def _feature_importance(self, module, statistic: FeatureStatistics, collector) -> torch.Tensor:
        config = self.config
        pooled = statistic.pooled_norm
        if isinstance(config, MWandaConfig):
            importance = mwanda_feature_importance(
                pooled,
                statistic.language_norms,
                statistic.activation_probability
                if statistic.active is not None
                else torch.zeros(1, pooled.numel()),
                config.variance_weight,
                config.activation_probability_weight,
            )
        else:
            importance = pooled
        if collector.negative_statistics:
            assert isinstance(config, WandaConfig)
            negative = collector.negative_statistic_for(module).pooled_norm
            importance = importance * negative_feature_factor(pooled, negative, config.negative_weight)
        if not torch.isfinite(importance).all():
            raise FloatingPointError(f"non-finite activation statistics for {module.name}")
        return importance

    def _measure_layer_signal(
        self,
        stack,
        layer_modules: list[list[PrunableLinear]],
        captured: CapturedInputs,
        signal_batches: list[dict[str, torch.Tensor]],
        first_batch: int,
        num_languages: int,
        show_progress: bool,
    ) -> list[float]:
        """One dense pass over the signal batches: OWL outlier ratio or CWL correlation per layer."""
        config = self.config
        hidden = [captured.hidden_states[first_batch + i] for i in range(len(signal_batches))]
        signal: list[float] = []
        progress = tqdm(
            list(enumerate(stack.layers)),
            desc=f"Layer schedule ({config.layerwise})",
            unit="layer",
            disable=not show_progress,
        )
        for index, layer in progress:
            modules = layer_modules[index]
            collector = LayerStatisticsCollector(
                modules, lambda n, device: FeatureStatistics(n, num_languages, device=device)
            )
            with collector.attached(), torch.no_grad():
                for i, batch in enumerate(signal_batches):
                    collector.set_batch(batch["attention_mask"], batch["language"])
                    hidden[i] = captured.call(hidden[i], layer, index, first_batch + i)
                    collector.end_batch()
            synchronise_collector(collector)
            if not modules:
                signal.append(0.0)
            elif config.layerwise == "owl":
                scores = [
                    wanda_scores(
                        m.read_weight().to(collector.statistic_for(m).pooled_norm.device),
                        collector.statistic_for(m).pooled_norm,
                    )
                    for m in modules
                ]
                signal.append(outlier_ratio(scores, config.owl_outlier_threshold))
            else:
                profiles = torch.cat([s.language_norms.cpu() for s in collector.statistics], dim=1)
                signal.append(cross_lingual_correlation(profiles))
        return signal

    # -- Hub integration (implemented in optimum_mwanda.hub) ------------------------------------------
    def _require_report(self) -> PruningReport:
        if self.report is None:
            raise RuntimeError("no pruning report yet: call prune_model(...) before saving or pushing")
        return self.report

    def _base_model(self, base_model: str | None) -> str | None:
        if base_model is not None:
            return base_model
        name = self._require_report().base_model
        # A local folder is no Hub id: the card then names no base model unless told.
        return name if name and not os.path.exists(name) else None

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
        ``pruning_report.json`` and a model card, atomically. ``compressed=True`` writes the bitmask-packed
        sparse format that :func:`optimum_mwanda.load_pruned_model` restores. Returns the folder path.
        """
        from .hub import save_pruned_model

        return save_pruned_model(
            model,
            save_directory,
            self._require_report(),
            tokenizer=tokenizer,
            compressed=compressed,
            eval_results=eval_results,
            base_model=self._base_model(base_model),
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
            base_model=self._base_model(base_model),
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
            base_model=self._base_model(base_model),
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------------
def _as_calibration_set(calibration, tokenizer, config: PruningConfig, what: str) -> CalibrationSet:
    if isinstance(calibration, CalibrationSet):
        return calibration
    if calibration is None:
        if tokenizer is None:
            raise ValueError(
                f"{what} is None and no tokenizer was given: pass token ids, or texts and a tokenizer"
            )
        from .calibration import default_calibration

        return default_calibration(
            tokenizer,
            samples_per_language=config.samples_per_language,
            seq_len=config.calibration_seq_len,
            seed=config.seed,
        )
    if not isinstance(calibration, Mapping):
        raise TypeError(
            f"{what} must be a CalibrationSet or a mapping {{language: token ids or texts}}, "
            f"got {type(calibration).__name__}"
        )
    if not calibration:
        raise ValueError(f"{what} is empty: give at least one language")
    values = list(calibration.values())
    if all(isinstance(v, torch.Tensor) for v in values):
        return CalibrationSet.from_token_ids(calibration)
    if all(
        isinstance(v, str) or (isinstance(v, Sequence) and all(isinstance(t, str) for t in v)) for v in values
    ):
        if tokenizer is None:
            raise ValueError(f"{what} holds texts: pass the model's tokenizer as tokenizer=")
        return build_calibration(
            {k: [v] if isinstance(v, str) else list(v) for k, v in calibration.items()},
            tokenizer,
            samples_per_language=config.samples_per_language,
            seq_len=config.calibration_seq_len,
            seed=config.seed,
        )
    raise TypeError(f"{what} values must all be LongTensors of token ids or all be lists of strings")


def _fingerprint(config, model, layer_modules, calibration_set, negative_set) -> str:
    config_data = {k: v for k, v in config.to_dict().items() if k != "optimum_mwanda_version"}
    tensors = [calibration_set.input_ids, calibration_set.attention_mask, calibration_set.language_index]
    if negative_set is not None:
        tensors += [negative_set.input_ids, negative_set.attention_mask]
    layout = {
        "architecture": type(model).__name__,
        "languages": calibration_set.language_list,
        "modules": [[m.name, list(m.shape)] for modules in layer_modules for m in modules],
    }
    return run_fingerprint(config_data, tensors, layout)


def _validate_modules(layer_modules: list[list[PrunableLinear]], config: PruningConfig) -> None:
    if not any(layer_modules):
        raise ValueError("no prunable linear modules found in the decoder layers (check config.ignore)")
    nm = config.nm_structure
    if nm is None:
        return
    bad = [
        f"{m.name} ({m.in_features})" for modules in layer_modules for m in modules if m.in_features % nm[1]
    ]
    if bad:
        raise ValueError(
            f"mask_structure {config.mask_structure!r} needs in_features divisible by {nm[1]}; not so for: "
            + ", ".join(bad[:5])
            + (" ..." if len(bad) > 5 else "")
        )


def _validate_token_ids(model: nn.Module, *sets: CalibrationSet | None) -> None:
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None) or embeddings.weight.shape[0]
    for calibration_set in sets:
        if calibration_set is None:
            continue
        ids = calibration_set.input_ids
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(
                f"calibration token ids must lie in [0, {vocab}) for this model, found range "
                f"[{int(ids.min())}, {int(ids.max())}]: was it tokenized with another tokenizer?"
            )


def _batches(calibration_set: CalibrationSet, batch_size: int, context=None) -> list[dict[str, torch.Tensor]]:
    """This rank's shard of ``calibration_set`` in batches (language positions those of the full set)."""
    index = local_indices(calibration_set.languages, context)
    input_ids, attention_mask = calibration_set.input_ids[index], calibration_set.attention_mask[index]
    language_index = calibration_set.language_index[index]
    batches = []
    for start in range(0, len(index), batch_size):
        end = start + batch_size
        batches.append(
            {
                "input_ids": input_ids[start:end],
                "attention_mask": attention_mask[start:end],
                "language": language_index[start:end],
            }
        )
    return batches


def _signal_subset(calibration_set: CalibrationSet, config: PruningConfig) -> CalibrationSet:
    limit = config.layerwise_samples_per_language
    if limit is None:
        return calibration_set
    taken: dict[str, int] = {}
    keep = []
    for i, lang in enumerate(calibration_set.languages):
        if taken.get(lang, 0) < limit:
            keep.append(i)
            taken[lang] = taken.get(lang, 0) + 1
    index = torch.tensor(keep, dtype=torch.long)
    # Language positions must match the full set's so statistics rows line up.
    subset = CalibrationSet(
        calibration_set.input_ids[index],
        calibration_set.attention_mask[index],
        [calibration_set.languages[i] for i in keep],
    )
    assert subset.language_list == calibration_set.language_list
    return subset
