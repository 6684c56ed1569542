"""How much memory a pruning run needs: a small formula per method, checked against measurement.

The walk prunes one decoder layer at a time. Its memory on the device that runs the layer is

- the layer's weights (``params * weight_bytes``; the rest of the model may sit on the CPU or disk);
- the activation store: every calibration token's hidden state (``tokens * hidden * activation_bytes``);
- the layer step: the statistics of every shared-input group of the layer, accumulated together in one
  pass (plus one batch's forward), then each group's update in turn, while the statistics of the groups
  not yet pruned wait (on the device, or on the CPU with ``offload_statistics``).

A shared-input group is the modules that read one input (``q/k/v``; ``gate/up``; ``o``; ``down``; each
expert's ``gate/up`` and ``down``) with ``in`` input features and ``R`` output rows in all. Per group, in
bytes (``s`` the statistics dtype's size, ``L`` the calibration languages):

- statistics: Wanda ``8 L in``; M-Wanda closed form ``24 L in`` (sums of squares, sums, activity);
  SparseGPT and M-Wanda's sweep ``s in^2`` (the ``X^T X`` accumulator);
- update: Wanda ``22 r in`` per weight of ``r`` rows (the scores and the per-row selection's buffers), N:M
  ``17 r in`` (the sort's int64 indices); M-Wanda's closed form ``25 r in`` (the kept weights, the keep
  mask as floats, the correction and its product); the sweep: the float32 ``H``
  (``4 in^2``, made in place from a float32 accumulator), its inverse's factorisation (``5 in^2`` at the
  peak: the reversed copy, factorised and inverted in place, and a quarter-size temporary), ``W^T`` and the mask
  (``5 R in``), then the refinement (the dense weight and masks ``6 R in``, plus ``36 c in`` for a chunk
  of ``c = min(R, 1024)`` rows) and the output copies (``5 R in``); each weight computed in float32 (a
  bfloat16 weight adds its float32 copy, ``4 r in`` while it is used).

:func:`layer_peak` combines them into the layer step's peak; :func:`run_peak` adds the weights and the
activation store. ``benchmarks/scale.py`` measures one layer of Llama-3.1-8B and part of a 70B layer
against these numbers (docs/large-models.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from .parts.statistics import MAX_GROUP_TOKENS

GIB = 2**30

#: the methods the formulas know: Wanda, M-Wanda's closed form, SparseGPT, M-Wanda's sweep
METHODS = ("wanda", "mwanda_closed_form", "sparsegpt", "mwanda_sweep")

# Bytes per weight element of one weight's update (float32 weights). N:M is read off the code (the scores,
# the sort's values and int64 indices, the mask: 17). The per-row selection reads 16 off the code (the
# scores, and kthvalue's copy of them with an int64 index buffer) but measured 22.1 on Llama-3.1-8B's
# q_proj (RSS, benchmarks/scale.py); the closed form's correction (kept weights, the keep mask as floats,
# the correction, its product and the result) measured 25.5. Both are set from those measurements and
# checked on the other shapes (docs/large-models.md).
_WANDA_UNSTRUCTURED = 22
_WANDA_NM = 17
_CLOSED_FORM = 25
# The sweep's factorisation of an in x in matrix, at its peak, in float32 matrices beyond H: the reversed
# copy (factorised, inverted and reversed back in place) and a quarter-size temporary.
_FACTOR_MATRICES = 1.25
_REFINEMENT_CHUNK = 1024
_REFINEMENT_BUFFERS = 9  # float32 [chunk, in] buffers of one conjugate-gradient chunk


class InsufficientMemoryError(RuntimeError):
    """The predicted peak of a pruning run exceeds the memory available on its device."""


@dataclasses.dataclass(frozen=True)
class LinearGroup:
    """Linear modules that read the same input: ``in_features`` inputs, one entry of ``rows`` per module;
    ``count`` identical groups (experts)."""

    name: str
    in_features: int
    rows: tuple[int, ...]
    count: int = 1

    @property
    def params(self) -> int:
        return self.in_features * sum(self.rows) * self.count


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """The prunable shapes of one decoder layer (Llama-style attention; a dense MLP or ``experts``
    routed experts of ``moe_intermediate`` each)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int | None = None
    experts: int = 0
    active_experts: int = 0
    moe_intermediate: int = 0

    @property
    def groups(self) -> list[LinearGroup]:
        hd = self.head_dim or self.hidden // self.heads
        h = self.hidden
        groups = [
            LinearGroup("qkv", h, (self.heads * hd, self.kv_heads * hd, self.kv_heads * hd)),
            LinearGroup("o", self.heads * hd, (h,)),
        ]
        if self.experts:
            i = self.moe_intermediate
            groups += [
                LinearGroup("expert gate_up", h, (i, i), self.experts),
                LinearGroup("expert down", i, (h,), self.experts),
            ]
        else:
            i = self.intermediate
            groups += [LinearGroup("gate_up", h, (i, i)), LinearGroup("down", i, (h,))]
        return groups

    @property
    def params(self) -> int:
        return sum(group.params for group in self.groups)

    @classmethod
    def from_config(cls, config) -> LayerShape:
        """From a transformers config (``LlamaConfig``, ``Qwen3MoeConfig``, ...)."""
        text = getattr(config, "text_config", None) or config
        experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0
        return cls(
            hidden=text.hidden_size,
            intermediate=getattr(text, "intermediate_size", 0) or 0,
            heads=text.num_attention_heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None),
            experts=experts,
            active_experts=getattr(text, "num_experts_per_tok", 0) or 0,
            moe_intermediate=getattr(text, "moe_intermediate_size", 0) or 0,
        )


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What the formulas need to know of a run's config."""

    method: str
    nm: bool = False
    refinement_steps: int = 0
    statistics_bytes: int = 8
    languages: int = 1
    #: the sweep's inverse factor alive until the group ends (the code before it freed its block views:
    #: what the committed one-layer measurements of the sweep ran)
    factor_kept: bool = False
    #: columns of M-Wanda's covariance sketch (``compensation_rank + oversampling``; 0: none)
    sketch_width: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.statistics_bytes not in (4, 8):
            raise ValueError("statistics_bytes is 4 (float32) or 8 (float64)")

    @property
    def sweep(self) -> bool:
        return self.method in ("sparsegpt", "mwanda_sweep")

    @classmethod
    def from_config(cls, config, languages: int = 1, statistics_bytes: int = 8) -> MethodSpec:
        """From a resolved pruning config (``config.resolve()``: its weight update an object with a
        ``name``, ``rank`` or ``refinement_steps``)."""
        from .configuration import MWANDA_DEFAULTS

        name = config.method
        update = getattr(config, "weight_update", None)
        if name == "mwanda":
            name = "mwanda_sweep" if getattr(update, "name", update) == "sweep" else "mwanda_closed_form"
        rank = getattr(update, "rank", 0) or 0 if name == "mwanda_closed_form" else 0
        return cls(
            method=name,
            sketch_width=rank + MWANDA_DEFAULTS.sketch_oversampling if rank else 0,
            nm=config.nm_structure is not None,
            refinement_steps=getattr(update, "refinement_steps", 0) or 0,
            statistics_bytes=statistics_bytes if name in ("sparsegpt", "mwanda_sweep") else 8,
            languages=languages,
        )


def statistic_bytes(spec: MethodSpec, group: LinearGroup) -> int:
    """Bytes of one group's statistics (all ``count`` copies)."""
    n = group.in_features
    if spec.sweep:
        each = spec.statistics_bytes * n * n
    elif spec.method == "mwanda_closed_form":
        # Sums of squares, sums and activity per language; the sketch (float64) and its test matrix.
        each = 24 * spec.languages * n + 12 * spec.sketch_width * n
    else:
        each = 8 * spec.languages * n
    return each * group.count


def update_peak(spec: MethodSpec, group: LinearGroup, weight_bytes: int = 4) -> int:
    """Peak bytes of one group's update, its own statistic included (one expert at a time)."""
    n, rows = group.in_features, group.rows
    total_rows = sum(rows)
    copy = 4 if weight_bytes != 4 else 0  # per element: the float32 copy of a bfloat16 weight
    if not spec.sweep:
        per_element = _WANDA_NM if spec.nm else _WANDA_UNSTRUCTURED
        if spec.method == "mwanda_closed_form":
            per_element = max(per_element, _CLOSED_FORM)  # the correction follows the mask
        done, peak = 0, 0
        for r in rows:  # one weight at a time; the finished ones' float32 results stay
            peak = max(peak, 4 * done * n + (per_element + copy) * r * n)
            done += r
        return statistic_bytes(spec, dataclasses.replace(group, count=1)) + peak
    h = 4 * n * n
    release = (8 * n * n + h) if spec.statistics_bytes == 8 else h
    weights = 5 * total_rows * n  # W^T and the mask
    phases = [
        release,
        h + 8 * total_rows * n,  # W^T: concatenation, then its transposed copy
        h + 4 * total_rows * n + _FACTOR_MATRICES * h,
        h + h + weights,  # the sweep, with the inverse's factor
    ]
    after = h + (h if spec.factor_kept else 0)  # H, and the factor where it was not freed
    phases.append(after + weights + 5 * total_rows * n)  # the result's copies
    if spec.refinement_steps:
        chunk = min(total_rows, _REFINEMENT_CHUNK)
        # The dense weight (its float32 copies while it is concatenated) and the keep masks.
        dense = (6 + copy) * total_rows * n
        phases.append(after + weights + dense + _REFINEMENT_BUFFERS * 4 * chunk * n)
    return int(max(phases))


@dataclasses.dataclass(frozen=True)
class LayerPeak:
    """Bytes of one layer step: ``statistics`` (all groups), ``update`` (the largest group's, its
    statistic included) and ``step`` (the largest live total, forward of one batch excluded)."""

    statistics: int
    update: int
    step: int


def layer_peak(
    spec: MethodSpec, groups: Sequence[LinearGroup], weight_bytes: int = 4, offload_statistics: bool = False
) -> LayerPeak:
    """The layer step's peaks: groups are pruned in order; each group's statistic is freed once pruned,
    and the later groups' statistics wait on the device unless ``offload_statistics``."""
    stats = [statistic_bytes(spec, g) for g in groups]
    updates = [update_peak(spec, g, weight_bytes) for g in groups]
    step = sum(stats)
    for index, (group, update) in enumerate(zip(groups, updates)):
        waiting = 0 if offload_statistics else sum(stats[index + 1 :])
        # The other experts of the same group wait too (pruned one at a time).
        waiting += 0 if offload_statistics else stats[index] * (group.count - 1) // group.count
        step = max(step, waiting + update)
    return LayerPeak(statistics=sum(stats), update=max(updates), step=int(step))


def forward_bytes(shape: LayerShape, batch_tokens: int, activation_bytes: int) -> int:
    """One batch through the layer during the statistics pass: hidden states and the MLP's
    intermediates (about ``6 h + 3 i`` values per token), plus a float32 copy of the widest input."""
    width = shape.moe_intermediate * shape.active_experts if shape.experts else shape.intermediate
    widest = max(shape.hidden, width)
    return batch_tokens * ((6 * shape.hidden + 3 * width) * activation_bytes + 8 * widest)


@dataclasses.dataclass(frozen=True)
class RunPeak:
    """Predicted peak bytes on the device of a layer-by-layer run, and its parts (``forward``: the
    statistics pass's transients, one batch's forward and, for a sweep, the sampled tokens waiting for
    their sequence group's ``X^T X`` product)."""

    layer_weights: int
    activations: int
    statistics: int
    update: int
    step: int
    forward: int
    total: int

    def as_gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in dataclasses.asdict(self).items()}


def run_peak(
    spec: MethodSpec,
    shape: LayerShape,
    tokens: int,
    batch_tokens: int,
    weight_bytes: int = 2,
    activation_bytes: int = 2,
    offload_statistics: bool = False,
    activations_on_device: bool = True,
    groups: Sequence[LinearGroup] | None = None,
) -> RunPeak:
    """Peak device memory of pruning a model layer by layer: one layer's weights (and a copy of its pruned
    weights, which the walk keeps until the layer ends), the activation store (unless it waits on the
    CPU: ``activations_on_device=False``), and the larger of the statistics pass (all statistics plus one
    batch's forward) and the worst group update with the statistics still waiting."""
    groups = list(groups if groups is not None else shape.groups)
    params = sum(g.params for g in groups)
    peak = layer_peak(spec, groups, weight_bytes, offload_statistics)
    layer_weights = 2 * params * weight_bytes
    activations = tokens * shape.hidden * activation_bytes if activations_on_device else 0
    activations += batch_tokens * shape.hidden * activation_bytes  # one batch's output before it replaces
    forward = forward_bytes(shape, batch_tokens, activation_bytes)
    if spec.sweep:  # float32 tokens waiting for their sequence group's product (experts: per sequence)
        forward += 4 * MAX_GROUP_TOKENS * sum(g.in_features for g in groups if g.count == 1)
    step = max(peak.statistics + forward, peak.step)
    total = layer_weights + activations + step
    return RunPeak(layer_weights, activations, peak.statistics, peak.update, peak.step, forward, total)


# -- shared-input groups of real modules --------------------------------------------------------------
# Module names that read one input inside the same parent (q/k/v, gate/up, Mixtral's w1/w3).
_SHARED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def groups_of_modules(modules: Iterable[tuple[str, int, int]]) -> list[LinearGroup]:
    """Shared-input groups of ``(name, in_features, out_features)`` modules by their names (before the
    run, which finds the groups by their inputs): modules of one set in :data:`_SHARED` under the same
    parent share a group; every other module is its own group."""
    groups: dict[tuple[str, int], list[tuple[str, int, int]]] = {}
    for name, in_features, out_features in modules:
        parent, _, leaf = name.rpartition(".")
        key = next((f"{parent}.{'/'.join(s)}" for s in _SHARED if leaf in s), name)
        groups.setdefault((key, in_features), []).append((name, in_features, out_features))
    return [
        LinearGroup(key, in_features, tuple(out for _, _, out in members))
        for (key, in_features), members in groups.items()
    ]


def check_fits(predicted: int, available: int, what: str, options: Sequence[str]) -> None:
    """Raise :class:`InsufficientMemoryError` when ``predicted`` bytes exceed ``available``."""
    if predicted <= available:
        return
    hint = "; ".join(options) if options else "use a device with more memory"
    raise InsufficientMemoryError(
        f"{what} needs about {_size(predicted)} but {_size(available)} are available; nothing was changed. "
        f"Options that lower the peak: {hint}"
    )


def _size(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB / 10 else f"{count / 2**20:.1f} MiB"
