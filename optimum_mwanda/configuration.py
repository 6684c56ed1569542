"""Pruning configurations: one dataclass per method, sharing :class:`PruningConfig`.

Configs are frozen data. They validate themselves on construction (so a bad value fails before any model is
touched), round-trip through ``to_dict``/``from_dict`` and JSON files with a version stamp, and
:meth:`PruningConfig.resolve` makes every automatic choice (one named function each, below) into a new,
fully explicit config that the run uses and its report records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .methods.registry import Description, method_entry, method_names
from .version import __version__

LAYERWISE_SCHEDULES = ("uniform", "depth", "owl", "cwl")
MEAN_COMPENSATIONS = ("language", "pooled", "none")
WEIGHT_UPDATES = ("closed_form", "sweep")  # and "none" as a resolved NoUpdate
#: How the sweep picks the pruned ``M - N`` of each ``N:M`` group: SparseGPT's ``"greedy"`` ranking of the
#: group's columns, or ``"joint"``, the pattern of least total OBS loss (methods/sparsegpt.py).
NM_SELECTIONS = ("greedy", "joint")
_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_mask_structure(mask_structure: str) -> tuple[int, int] | None:
    """Parse ``"unstructured"`` (returns ``None``) or ``"N:M"`` (returns ``(N, M)``).

    ``"N:M"`` follows the NVIDIA convention: at most ``N`` non-zero weights are kept in every group of ``M``
    consecutive input weights of an output row, so ``"2:4"`` is 50% sparse.
    """
    if not isinstance(mask_structure, str):
        raise TypeError(f"mask_structure must be a string, got {type(mask_structure).__name__}")
    if mask_structure.strip().lower() == "unstructured":
        return None
    match = _NM_PATTERN.match(mask_structure)
    if match is None:
        raise ValueError(
            f"mask_structure={mask_structure!r} is malformed: use 'unstructured' or 'N:M' such as '2:4'"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if m < 2 or not 0 < n < m:
        raise ValueError(
            f"mask_structure={mask_structure!r} is impossible: N:M needs 0 < N < M (N weights kept in every M)"
        )
    return n, m


# -- parts of a method that are config data: the weight updates -------------------------------------------
@dataclass(frozen=True)
class NoUpdate:
    """Weight update: none. The pruned weights become zero and the kept ones stay as they were (Wanda)."""

    name: ClassVar[str] = "none"

    def validate(self) -> None:
        """Nothing to check."""

    def settings(self) -> dict[str, Any]:
        return {}

    def describe(self) -> Description:
        return Description("weight update", "none", "the kept weights stay as they were", {})


@dataclass(frozen=True)
class ClosedForm:
    """Weight update: M-Wanda's closed-form compensation of each row's kept weights.

    Args:
        rank: also keep the output along this many principal directions of the within-language input
            covariance (``0``: the means only). ``None``: :func:`default_compensation_rank`. An explicit
            rank must not exceed the smallest input width of the pruned modules (expert matrices
            included): :meth:`Pruner.prune_model` checks it before any weight changes. The default is
            capped per module at that module's input width instead.
        shrinkage: shrink the modelled input second moment towards its diagonal, ``H + d * diag(H)``
            (changes the update, not the mask). ``None``: :func:`default_shrinkage`.
    """

    name: ClassVar[str] = "closed_form"
    rank: int | None = None
    shrinkage: float | None = None

    def validate(self) -> None:
        rank = self.rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
            raise ValueError(f"compensation_rank must be a non-negative integer, got {rank!r}")
        if self.shrinkage is not None:
            _check_diagonal_dampening(self.shrinkage)

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "shrinkage": self.shrinkage}

    def describe(self, means: str = "language") -> Description:
        scope = "in every calibration language" if means == "language" else "over the calibration text"
        directions = (
            f" and its output along the {self.rank} main directions in which the calibration inputs vary"
            if self.rank
            else ""
        )
        return Description(
            "weight update",
            "closed form",
            f"the remaining weights of each row are adjusted, in closed form, to restore the row's mean output "
            f"{scope}{directions}",
            {"mean_compensation": means, **self.settings()},
            "mwanda",
        )


@dataclass(frozen=True)
class ColumnSweep:
    """Weight update: SparseGPT's column sweep, which chooses the mask while it updates the kept weights
    (SparseGPT, and M-Wanda's ``weight_update="sweep"``). ``None`` settings take the method's default.

    Args:
        block_size: columns per lazy-update block (``None``: 128).
        dampening: share of the mean Hessian diagonal added to it (``None``: 0.01).
        diagonal_dampening: ``H + d * diag(H)``: shrinks the cross-feature structure fitted to the
            calibration text (``None``: 0 for SparseGPT, :func:`default_shrinkage` for M-Wanda).
        hessian_token_stride: the Hessian from every ``k``-th token of each sequence (``None``: 1 for
            SparseGPT, :func:`automatic_hessian_token_stride` for M-Wanda). A resolved config may hold
            ``{in_features: stride}`` when the automatic stride differs between input widths.
        nm_selection: at ``N:M``: ``"greedy"`` (the reference) or ``"joint"`` (``None``: ``"greedy"``).
        refinement_steps: conjugate-gradient steps on the kept weights after the sweep (``None``: 0 for
            SparseGPT, :func:`default_refinement_steps` for M-Wanda).
    """

    name: ClassVar[str] = "sweep"
    block_size: int | None = None
    dampening: float | None = None
    diagonal_dampening: float | None = None
    hessian_token_stride: int | Mapping[int, int] | None = None
    nm_selection: str | None = None
    refinement_steps: int | None = None

    def validate(self) -> None:
        if self.block_size is not None:
            _check_positive_int("block_size", self.block_size)
        if self.dampening is not None and (
            isinstance(self.dampening, bool)
            or not isinstance(self.dampening, (int, float))
            or not math.isfinite(self.dampening)
            or not self.dampening > 0
        ):
            raise ValueError(f"dampening must be a finite number > 0, got {self.dampening!r}")
        if self.diagonal_dampening is not None:
            _check_diagonal_dampening(self.diagonal_dampening)
        stride = self.hessian_token_stride
        if isinstance(stride, Mapping):
            for width, value in stride.items():
                _check_positive_int("hessian_token_stride input width", width)
                _check_positive_int("hessian_token_stride", value)
        elif stride is not None:
            _check_positive_int("hessian_token_stride", stride)
        if self.nm_selection is not None:
            _check_nm_selection(self.nm_selection)
        if self.refinement_steps is not None:
            _check_refinement_steps(self.refinement_steps)

    def stride_for(self, in_features: int) -> int | None:
        """The token stride of an ``in_features``-wide input (``None`` while unresolved)."""
        stride = self.hessian_token_stride
        if isinstance(stride, Mapping):
            return stride.get(in_features)
        return stride

    def settings(self) -> dict[str, Any]:
        stride = self.hessian_token_stride
        if isinstance(stride, Mapping):
            stride = {int(width): int(value) for width, value in sorted(stride.items())}
        return {
            "block_size": self.block_size,
            "dampening": self.dampening,
            "diagonal_dampening": self.diagonal_dampening,
            "hessian_token_stride": stride,
            "nm_selection": self.nm_selection,
            "refinement_steps": self.refinement_steps,
        }

    def describe(self) -> Description:
        return Description(
            "weight update",
            "column sweep",
            "SparseGPT's column sweep chooses the mask column by column and adjusts the remaining weights of "
            "each row to compensate, in closed form on the layer-input Hessian",
            self.settings(),
            "sparsegpt",
        )


WeightUpdate = NoUpdate | ClosedForm | ColumnSweep
_UPDATE_CLASSES: dict[str, type] = {cls.name: cls for cls in (NoUpdate, ClosedForm, ColumnSweep)}


def weight_update_from_dict(data: Mapping[str, Any]) -> WeightUpdate:
    """Rebuild a weight update from its ``to_dict`` form ``{"name": ..., **settings}``."""
    data = dict(data)
    name = data.pop("name", None)
    if name not in _UPDATE_CLASSES:
        raise ValueError(f"weight_update must be one of {list(WEIGHT_UPDATES)}, got {name!r}")
    stride = data.get("hessian_token_stride")
    if isinstance(stride, Mapping):  # JSON turned the input widths into strings
        data["hessian_token_stride"] = {int(width): value for width, value in stride.items()}
    return _UPDATE_CLASSES[name](**data)


def _update_to_dict(update: WeightUpdate) -> dict[str, Any]:
    return {"name": update.name, **update.settings()}


# -- the automatic choices, one named function each ----------------------------------------------------------
@dataclass(frozen=True)
class MWandaDefaults:
    """The numbers behind M-Wanda's automatic choices, each the best measured on Gemma 3 270M
    (``docs/methods.md`` gives the measurement behind each)."""

    #: closed form: r = 32 measured best (docs/mwanda.md, round 3), at 1.13x Wanda's prune time
    compensation_rank: int = 32
    #: closed form: 0.1 lowered 50% and 60% on both seeds and the absent languages at 70% by 2.7%
    #: (rounds 8 and 9)
    closed_form_shrinkage: float = 0.1
    #: sweep: 0.3 favours the languages not calibrated on (rounds 5, 9 and 10)
    sweep_shrinkage: float = 0.3
    #: the sweep from this unstructured sparsity (round 10: at 70% lower than the closed form everywhere;
    #: at 65% all 11 languages below Wanda)
    sweep_from_sparsity: float = 0.65
    #: sweep: five conjugate-gradient steps took 2:4 from 141.7 to 118.3 in-domain (round 7)
    refinement_steps: int = 5
    #: the automatic token stride: at most every 4th token (every 8th cost the N:M sweep 0.6-4.3%)...
    max_hessian_token_stride: int = 4
    #: ... leaving at least 1.75 sampled tokens per input feature (0.875 lost a quarter; rounds 4 and 6)
    hessian_tokens_per_input: float = 1.75
    #: extra columns of the randomized covariance sketch beyond the compensation rank
    sketch_oversampling: int = 16


MWANDA_DEFAULTS = MWandaDefaults()


def default_layer_schedule(default: str, sparsity: float, mask_structure: str, layerwise_range: float) -> str:
    """The schedule of ``layerwise=None``: the method's ``default``, or ``"uniform"`` where a non-uniform one
    is impossible (an ``N:M`` structure, or ``sparsity +/- layerwise_range`` outside ``[0, 1)``)."""
    fits = 0 <= sparsity - layerwise_range and sparsity + layerwise_range < 1
    return default if parse_mask_structure(mask_structure) is None and fits else "uniform"


def default_weight_update(sparsity: float, mask_structure: str, mean_compensation: str) -> str:
    """M-Wanda's update of ``weight_update=None``: the column sweep at ``N:M`` and from
    ``MWANDA_DEFAULTS.sweep_from_sparsity`` (0.65) unstructured, the closed form below, and the closed
    form (which then changes nothing) with ``mean_compensation="none"``."""
    forced = (
        parse_mask_structure(mask_structure) is not None or sparsity >= MWANDA_DEFAULTS.sweep_from_sparsity
    )
    return "sweep" if forced and mean_compensation != "none" else "closed_form"


def default_shrinkage(update: str, mean_compensation: str = "language") -> float:
    """The shrinkage ``d`` of ``H + d * diag(H)`` when none is given: 0.3 for M-Wanda's sweep, 0.1 for its
    closed form, 0 without a compensation (nothing to shrink)."""
    if update == "sweep":
        return MWANDA_DEFAULTS.sweep_shrinkage
    return MWANDA_DEFAULTS.closed_form_shrinkage if mean_compensation != "none" else 0.0


def default_compensation_rank(mean_compensation: str) -> int:
    """The closed form's rank when none is given: 32, or 0 without a compensation."""
    return MWANDA_DEFAULTS.compensation_rank if mean_compensation != "none" else 0


def default_refinement_steps(update: str) -> int:
    """M-Wanda's conjugate-gradient steps after the sweep when none are given (the closed form has none)."""
    return MWANDA_DEFAULTS.refinement_steps if update == "sweep" else 0


def automatic_hessian_token_stride(calibration_tokens: int, in_features: int) -> int:
    """M-Wanda's token stride for an ``in_features``-wide input: the largest up to
    ``MWANDA_DEFAULTS.max_hessian_token_stride`` (4) that leaves ``hessian_tokens_per_input`` (1.75)
    sampled tokens per input of the run's ``calibration_tokens``: 4 with 14336 or more tokens at 2048."""
    from .parts.statistics import hessian_token_stride_for  # exact arithmetic, the same on every rank

    return hessian_token_stride_for(
        calibration_tokens,
        in_features,
        MWANDA_DEFAULTS.max_hessian_token_stride,
        MWANDA_DEFAULTS.hessian_tokens_per_input,
    )


# -- configs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PruningConfig:
    """Settings shared by every pruning method.

    Configs are frozen: derive a changed one with ``dataclasses.replace(config, sparsity=0.6)``, which
    validates it again. The automatic choices (``None`` settings) are made by :meth:`resolve`, into a new
    config that :class:`~optimum_mwanda.PruningReport` records.

    Args:
        sparsity: fraction of weights set to zero in every pruned linear module, ``0 <= sparsity < 1``. With
            an ``N:M`` ``mask_structure`` it must equal ``1 - N/M``.
        mask_structure: ``"unstructured"`` (per output row) or ``"N:M"`` (``N`` kept in each group of ``M``).
        ignore: module-name patterns (``fnmatch`` globs or plain substrings) left dense. The LM head and the
            embeddings are never pruned.
        layerwise: per-layer sparsity schedule: ``"uniform"``, ``"depth"`` (rising linearly with depth),
            ``"owl"`` (outlier-weighted) or ``"cwl"`` (cross-lingual correlation, M-Wanda only). ``None``
            (the default) is :func:`default_layer_schedule`: ``"uniform"`` for Wanda and SparseGPT,
            ``"depth"`` for M-Wanda, and ``"uniform"`` whenever a non-uniform schedule is impossible.
        layerwise_range: the bound ``lambda`` of a non-uniform schedule: every layer's sparsity stays within
            ``sparsity +/- layerwise_range``.
        owl_outlier_threshold: OWL's ``M``: a weight is an outlier when its score exceeds ``M`` times the
            mean score of its layer.
        layerwise_samples_per_language: calibration sequences per language used by the extra dense pass
            that measures the signal of a non-uniform schedule (``None``: all of them). Fewer is cheaper.
        calibration_seq_len: tokens per calibration sequence when packing texts.
        samples_per_language: calibration sequences per language when packing texts.
        batch_size: sequences per forward pass during calibration.
        seed: seed for sampling calibration text, so the same inputs give the same masks.
    """

    method: ClassVar[str] = "base"
    allowed_layerwise: ClassVar[tuple[str, ...]] = ("uniform", "depth", "owl")
    default_layerwise: ClassVar[str] = "uniform"
    #: fields added after configs were first written, with the value a dict written without them ran with
    fields_added_later: ClassVar[dict[str, Any]] = {}
    #: names a dict or keyword may still use although they are no longer fields (mapped, deprecated)
    legacy_fields: ClassVar[tuple[str, ...]] = ()

    sparsity: float = 0.5
    mask_structure: str = "unstructured"
    ignore: tuple[str, ...] = ()
    layerwise: str | None = None
    layerwise_range: float = 0.08
    owl_outlier_threshold: float = 5.0
    layerwise_samples_per_language: int | None = 2
    calibration_seq_len: int = 512
    samples_per_language: int = 8
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        self._normalize()
        self.validate()

    def _set(self, name: str, value: Any) -> None:
        # Normalising what the constructor was given (before anyone holds the object) is not mutation.
        object.__setattr__(self, name, value)

    def _normalize(self) -> None:
        """Canonical forms of what was given: floats for float fields, a tuple of ignore patterns, and the
        layer schedule chosen by :func:`default_layer_schedule`."""
        self._validate_types()
        ignore = self.ignore
        if isinstance(ignore, str):
            ignore = (ignore,)
        elif isinstance(ignore, (list, tuple)):
            ignore = tuple(ignore)
        else:
            raise TypeError("ignore must be a list of non-empty module-name patterns")
        self._set("ignore", ignore)
        if self.layerwise is None:
            parse_mask_structure(self.mask_structure)  # a malformed structure fails as such first
            self._set(
                "layerwise",
                default_layer_schedule(
                    self.default_layerwise, self.sparsity, self.mask_structure, self.layerwise_range
                ),
            )

    # -- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first invalid field (never changes the config)."""
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must satisfy 0 <= sparsity < 1, got {self.sparsity}")
        nm = parse_mask_structure(self.mask_structure)
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if abs(implied - self.sparsity) > 1e-9:
                raise ValueError(
                    f"mask_structure={self.mask_structure!r} keeps {nm[0]} of every {nm[1]} weights, i.e. "
                    f"sparsity {implied:g}, but sparsity={self.sparsity:g}; set sparsity={implied:g}"
                )
            if self.layerwise != "uniform":
                raise ValueError(
                    "a non-uniform layerwise schedule cannot be combined with an N:M mask_structure"
                )
        if not all(isinstance(p, str) and p for p in self.ignore):
            raise TypeError("ignore must be a list of non-empty module-name patterns")
        if self.layerwise not in self.allowed_layerwise:
            raise ValueError(
                f"layerwise={self.layerwise!r} is not available for {type(self).__name__}; "
                f"choose one of {list(self.allowed_layerwise)}"
            )
        if not 0.0 <= self.layerwise_range < 1.0:
            raise ValueError(f"layerwise_range must be in [0, 1), got {self.layerwise_range}")
        if self.layerwise != "uniform" and (
            self.sparsity - self.layerwise_range < 0 or self.sparsity + self.layerwise_range >= 1
        ):
            raise ValueError(
                f"sparsity {self.sparsity} +/- layerwise_range {self.layerwise_range} leaves [0, 1); "
                "lower layerwise_range"
            )
        if self.owl_outlier_threshold <= 0:
            raise ValueError(f"owl_outlier_threshold must be > 0, got {self.owl_outlier_threshold}")
        if self.layerwise_samples_per_language is not None and (
            isinstance(self.layerwise_samples_per_language, bool)
            or not isinstance(self.layerwise_samples_per_language, int)
            or self.layerwise_samples_per_language < 1
        ):
            raise ValueError(
                "layerwise_samples_per_language must be a positive integer or None, "
                f"got {self.layerwise_samples_per_language!r}"
            )
        for name in ("calibration_seq_len", "samples_per_language", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def _validate_types(self) -> None:
        # Every float field must be a finite number: a NaN threshold compares False with everything and
        # would silently switch a feature off (``nan <= 0`` passes every range check below).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TypeError(f"{f.name} must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, got {value!r}")
                self._set(f.name, float(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    @property
    def nm_structure(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M structure, ``None`` when unstructured."""
        return parse_mask_structure(self.mask_structure)

    # -- resolution -------------------------------------------------------------------------------------
    def resolve(
        self, calibration_tokens: int | None = None, input_widths: Sequence[int] = ()
    ) -> PruningConfig:
        """This config with every automatic choice made (a new object; this one is never changed).

        ``calibration_tokens`` (the run's non-padding tokens) and ``input_widths`` (the ``in_features`` of
        the pruned modules) size the choices made from the run, such as M-Wanda's Hessian token stride.
        """
        return self

    # -- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``method`` and the ``optimum_mwanda_version`` that wrote it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["ignore"] = list(self.ignore)
        return {"method": self.method, **data, "optimum_mwanda_version": __version__}

    @classmethod
    def _old_defaults(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        """What a package-written dict lacking a field ran with (``fields_added_later``)."""
        return dict(cls.fields_added_later)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """Rebuild a config. On the base class, ``data["method"]`` picks the subclass."""
        data = dict(data)
        method = data.pop("method", None)
        written_by_package = data.pop("optimum_mwanda_version", None) is not None
        target = cls
        if cls is PruningConfig:
            if method is None:
                raise ValueError("cannot rebuild a PruningConfig without a 'method' entry")
            target = config_class_for_method(method)
        elif method is not None and method != cls.method:
            raise ValueError(f"{cls.__name__} cannot load a config for method {method!r}")
        known = {f.name for f in dataclasses.fields(target)} | set(target.legacy_fields)
        if written_by_package:
            # A dict our own to_dict wrote before a field existed ran with that field's old behaviour, not
            # with today's default: rebuilding it must not claim a setting the run never had.
            data = {**target._old_defaults(data), **data}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {target.__name__} fields: {unknown}")
        return target(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        """Write the config as JSON (atomically: the old file or the new one, never a part)."""
        from .files import write_file

        write_file(path, self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PruningConfig:
        """Read a config written by :meth:`to_json_file`."""
        with open(path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


@dataclass(frozen=True)
class WandaConfig(PruningConfig):
    """Wanda (Sun et al., 2024): score ``|W_ij| * ||X_j||_2``, weights compared within each output row.

    Args:
        negative_weight: exponent of the negative-calibration penalty (Kim et al.): with texts passed as
            ``negative_calibration`` the score is multiplied by ``(||X_j|| / ||X_j^neg||) ** negative_weight``,
            pruning first the features that are active on unwanted text. ``1.0`` is the published form.
    """

    method: ClassVar[str] = "wanda"
    negative_weight: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.negative_weight < 0:
            raise ValueError(f"negative_weight must be >= 0, got {self.negative_weight}")


@dataclass(frozen=True)
class SparseGPTConfig(PruningConfig):
    """SparseGPT (Frantar & Alistarh, 2023): second-order pruning with OBS weight updates.

    Args:
        block_size: columns processed per lazy-update block; masks are chosen adaptively per block.
        dampening: fraction of the mean Hessian diagonal added to the diagonal before inversion. When the
            Cholesky factorisation fails, it is retried with ten times the dampening (up to three times).
        hessian_token_stride: build the Hessian from every ``k``-th calibration token of each sequence only
            (``1``: every token, the reference algorithm). The ``in x in`` products cost about as much as
            the forward pass; ``4`` cuts them to a quarter for +1.8% perplexity at 2:4 on Gemma 3 270M
            (docs/mwanda.md, round 4).
        diagonal_dampening: add this share of each input's own diagonal entry to the Hessian before the
            sweep (``H + d * diag(H)``): shrinks the cross-feature structure fitted to the calibration text
            towards the diagonal, where the sweep is Wanda's mask with no update. ``0`` (default) is the
            reference algorithm; M-Wanda's sweep uses 0.3 (docs/mwanda.md, rounds 5, 9 and 10).
        nm_selection: at ``N:M``, how each group's pruned weights are chosen: ``"greedy"`` (default, the
            reference) ranks the group's columns by ``w^2 / [H^-1]_jj`` where the group starts;
            ``"joint"`` evaluates every pattern of the group (6 at 2:4, 70 at 4:8) with the weight
            updates that pruning the earlier columns makes to the later ones, and keeps the one of least
            OBS loss, per row (docs/mwanda.md, round 7). Unstructured masks are not affected.
        refinement_steps: after the sweep, this many conjugate-gradient steps lower each row's
            reconstruction loss on the same dampened Hessian with the mask fixed (the sweep never revisits
            a kept column; :func:`optimum_mwanda.parts.refine_kept_weights`). Each step costs one
            ``[rows, in] x [in, in]`` product; ``0`` (default) is the reference algorithm.
    """

    method: ClassVar[str] = "sparsegpt"
    block_size: int = 128
    dampening: float = 0.01
    hessian_token_stride: int = 1
    diagonal_dampening: float = 0.0
    nm_selection: str = "greedy"
    refinement_steps: int = 0

    def validate(self) -> None:
        super().validate()
        self.weight_update.validate()
        nm = self.nm_structure
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M={nm[1]}")

    @property
    def weight_update(self) -> ColumnSweep:
        """The column sweep with this config's settings (the part SparseGPT shares with M-Wanda)."""
        return ColumnSweep(
            self.block_size,
            self.dampening,
            self.diagonal_dampening,
            self.hessian_token_stride,
            self.nm_selection,
            self.refinement_steps,
        )


_FLAT_UPDATE_FIELDS = ("compensation_rank", "hessian_token_stride", "diagonal_dampening", "nm_selection",
                       "refinement_steps")  # fmt: skip


@dataclass(frozen=True)
class MWandaConfig(WandaConfig):
    """M-Wanda: Wanda with language-aware statistics (Choenni & Titov, 2025). See ``docs/methods.md``.

    With ``variance_weight=0``, ``activation_probability_weight=0`` and ``layerwise="uniform"`` the masks are
    exactly Wanda's on the same calibration data (and with ``mean_compensation="none"`` the weights too).

    Args:
        variance_weight: weight of the cross-lingual spread of a feature's per-language activation norm.
            A research knob for reproducing the paper: it measured worse on Gemma 3 270M (off by default).
        activation_probability_weight: weight of the activation-probability term that protects features
            consistently active in some language.
        activation_threshold: a feature is *active* on a token when ``|x_j|`` exceeds this multiple of the
            token's root-mean-square activation.
        cwl_protect: with ``layerwise="cwl"`` (the paper's schedule; a research knob that measured worse
            than ``"depth"`` overall on Gemma 3 270M, though best for Swahili): ``"specific"`` gives layers
            whose languages correlate less (language-specific layers) lower sparsity; ``"shared"`` the
            opposite.
        mean_compensation: after masking, adjust each row's kept weights in closed form so that its expected
            output is restored: ``"language"`` in every calibration language at once (per-language input
            means), ``"pooled"`` on the all-language mean only, ``"none"`` leaves the kept weights as they
            were (Wanda). Pruned positions stay exactly zero.
        weight_update: how the kept weights are updated: ``"closed_form"`` or a :class:`ClosedForm` (the mask
            from the M-Wanda score, then the compensation above, with its rank and shrinkage), or
            ``"sweep"`` or a :class:`ColumnSweep` (SparseGPT's column sweep on the token-sampled Hessian,
            which chooses the mask while it updates the weights). ``None`` (default):
            :func:`default_weight_update`, the sweep at ``N:M`` and from 65% sparsity, the closed form below.

    The flat settings ``compensation_rank``, ``hessian_token_stride``, ``diagonal_dampening``,
    ``nm_selection`` and ``refinement_steps`` are deprecated keywords (and old JSON entries): they are
    mapped into ``weight_update``.
    """

    method: ClassVar[str] = "mwanda"
    allowed_layerwise: ClassVar[tuple[str, ...]] = LAYERWISE_SCHEDULES
    default_layerwise: ClassVar[str] = "depth"
    fields_added_later: ClassVar[dict[str, Any]] = {
        "mean_compensation": "none",
        "compensation_rank": 0,
        "weight_update": "closed_form",
        "diagonal_dampening": 0.0,
        "nm_selection": "greedy",
        "refinement_steps": 0,
    }
    legacy_fields: ClassVar[tuple[str, ...]] = _FLAT_UPDATE_FIELDS

    # Defaults are the best setting measured on Gemma 3 270M (docs/methods.md): per-language mean
    # compensation is what beats Wanda, the depth schedule adds to it; the variance term and CWL made
    # perplexity worse there, so they are off unless asked for.
    variance_weight: float = 0.0
    activation_probability_weight: float = 0.25
    activation_threshold: float = 3.0
    cwl_protect: str = "specific"
    mean_compensation: str = "language"
    weight_update: str | WeightUpdate | None = None

    def __post_init__(self) -> None:
        # The deprecated flat keywords, parked by __init__ below (dataclasses.replace never passes them).
        flat = self.__dict__.pop("_legacy_flat", {})
        self._normalize()
        self._set("weight_update", self._update_from(self.weight_update, flat))
        self.validate()

    def _update_from(self, update: Any, flat: dict[str, Any]) -> WeightUpdate | None:
        """``weight_update`` as a part object (``None`` stays the automatic choice), with the deprecated flat
        settings mapped into it."""
        if isinstance(update, Mapping):
            update = weight_update_from_dict(update)
        if isinstance(update, str):
            if update not in WEIGHT_UPDATES:
                raise ValueError(f"weight_update must be one of {list(WEIGHT_UPDATES)}, got {update!r}")
            update = ColumnSweep() if update == "sweep" else ClosedForm()
        elif update is not None and not isinstance(update, (NoUpdate, ClosedForm, ColumnSweep)):
            raise ValueError(f"weight_update must be one of {list(WEIGHT_UPDATES)}, got {update!r}")
        given = {k: v for k, v in flat.items() if v is not None}
        if not given:
            return update
        warnings.warn(
            f"MWandaConfig({', '.join(sorted(given))}=...) is deprecated: give the settings inside "
            "weight_update (ClosedForm(rank, shrinkage) or ColumnSweep(...)); they are mapped there",
            DeprecationWarning,
            stacklevel=4,
        )
        if update is None:
            # An explicit rank asks for the closed form; otherwise the automatic choice.
            update = ClosedForm() if given.get("compensation_rank") is not None else None
            if update is None:
                kind = default_weight_update(self.sparsity, self.mask_structure, self.mean_compensation)
                update = ColumnSweep() if kind == "sweep" else ClosedForm()
        if isinstance(update, ColumnSweep):
            if given.get("compensation_rank"):
                raise ValueError('compensation_rank > 0 applies to weight_update="closed_form", not "sweep"')
            return dataclasses.replace(
                update,
                **{k: v for k, v in given.items() if k != "compensation_rank" and getattr(update, k) is None},
            )
        if isinstance(update, NoUpdate):
            update = ClosedForm(0, 0.0)
        if given.get("refinement_steps"):
            _check_refinement_steps(given["refinement_steps"])
            raise ValueError('refinement_steps applies to weight_update="sweep", not "closed_form"')
        if "hessian_token_stride" in given:
            _check_positive_int("hessian_token_stride", given["hessian_token_stride"])
        if "nm_selection" in given:
            _check_nm_selection(given["nm_selection"])
        return dataclasses.replace(
            update,
            rank=update.rank if update.rank is not None else given.get("compensation_rank"),
            shrinkage=update.shrinkage if update.shrinkage is not None else given.get("diagonal_dampening"),
        )

    def validate(self) -> None:
        super().validate()
        for name in ("variance_weight", "activation_probability_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.activation_threshold <= 0:
            raise ValueError(f"activation_threshold must be > 0, got {self.activation_threshold}")
        if self.cwl_protect not in ("specific", "shared"):
            raise ValueError(f"cwl_protect must be 'specific' or 'shared', got {self.cwl_protect!r}")
        if self.mean_compensation not in MEAN_COMPENSATIONS:
            raise ValueError(
                f"mean_compensation must be one of {list(MEAN_COMPENSATIONS)}, got {self.mean_compensation!r}"
            )
        update = self.weight_update
        if update is not None:
            update.validate()
        kind = (
            update.name
            if update is not None
            else default_weight_update(self.sparsity, self.mask_structure, self.mean_compensation)
        )
        none = self.mean_compensation == "none"
        if kind == "sweep" and none:
            raise ValueError(
                'weight_update="sweep" updates the kept weights; mean_compensation="none" asks to keep them'
            )
        if isinstance(update, ClosedForm) and none:
            if update.rank:
                raise ValueError(
                    'compensation_rank > 0 needs a compensation: mean_compensation "language" or "pooled"'
                )
            if update.shrinkage:
                raise ValueError(
                    'diagonal_dampening shrinks the compensation; mean_compensation="none" has none'
                )
        nm = self.nm_structure
        block = getattr(update, "block_size", None) or SparseGPTConfig.block_size
        if kind == "sweep" and nm is not None and block % nm[1]:
            raise ValueError(
                f'weight_update="sweep" needs M dividing its block of {block} columns, got {self.mask_structure}'
            )

    def resolve(
        self, calibration_tokens: int | None = None, input_widths: Sequence[int] = ()
    ) -> MWandaConfig:
        """This config with ``weight_update`` explicit: :class:`NoUpdate` (``mean_compensation="none"``), a
        :class:`ClosedForm` with its rank and shrinkage, or a :class:`ColumnSweep` with every setting, its
        token stride sized from ``calibration_tokens`` (per input width when they differ)."""
        return dataclasses.replace(self, weight_update=self.resolved_update(calibration_tokens, input_widths))

    def resolved_update(
        self, calibration_tokens: int | None = None, input_widths: Sequence[int] = ()
    ) -> WeightUpdate:
        """The weight update :meth:`resolve` records (see there)."""
        update = self.weight_update
        kind = (
            update.name
            if update is not None
            else default_weight_update(self.sparsity, self.mask_structure, self.mean_compensation)
        )
        if kind == "none" or (kind == "closed_form" and self.mean_compensation == "none"):
            return NoUpdate()
        if kind == "closed_form":
            given = update if isinstance(update, ClosedForm) else ClosedForm()
            return ClosedForm(
                default_compensation_rank(self.mean_compensation) if given.rank is None else given.rank,
                default_shrinkage(kind, self.mean_compensation)
                if given.shrinkage is None
                else given.shrinkage,
            )
        sweep = update if isinstance(update, ColumnSweep) else ColumnSweep()
        stride = sweep.hessian_token_stride
        if stride is None and calibration_tokens is not None and input_widths:
            strides = {
                width: automatic_hessian_token_stride(calibration_tokens, width)
                for width in sorted(set(input_widths))
            }
            stride = next(iter(strides.values())) if len(set(strides.values())) == 1 else strides
        return ColumnSweep(
            SparseGPTConfig.block_size if sweep.block_size is None else sweep.block_size,
            SparseGPTConfig.dampening if sweep.dampening is None else sweep.dampening,
            default_shrinkage(kind) if sweep.diagonal_dampening is None else sweep.diagonal_dampening,
            stride,
            "greedy" if sweep.nm_selection is None else sweep.nm_selection,
            default_refinement_steps(kind) if sweep.refinement_steps is None else sweep.refinement_steps,
        )

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        update = self.weight_update
        data["weight_update"] = None if update is None else _update_to_dict(update)
        return data

    @classmethod
    def _old_defaults(cls, data: Mapping[str, Any]) -> dict[str, Any]:
        # Dicts with weight_update as an object (or the automatic None) are this version's: nothing missing.
        if not isinstance(data.get("weight_update", "closed_form"), str):
            return {}
        return dict(cls.fields_added_later)


def _legacy_reader(name: str) -> property:
    """A read-only, deprecated view of a setting that moved into ``weight_update`` (its resolved value)."""

    def read(self: MWandaConfig) -> Any:
        warnings.warn(
            f"MWandaConfig.{name} is deprecated: read config.resolve().weight_update", DeprecationWarning, 2
        )
        update = self.resolved_update()
        if isinstance(update, ColumnSweep):
            return {"compensation_rank": 0}.get(name, getattr(update, name, None))
        rank, shrinkage = (update.rank, update.shrinkage) if isinstance(update, ClosedForm) else (0, 0.0)
        return {
            "compensation_rank": rank,
            "diagonal_dampening": shrinkage,
            "nm_selection": "greedy",
            "refinement_steps": 0,
        }.get(name)

    return property(read, doc=f"Deprecated: the resolved weight update's {name}.")


def _with_legacy_keywords(init: Any) -> Any:
    """MWandaConfig's ``__init__``, also taking the deprecated flat settings as keywords."""

    def __init__(
        self: MWandaConfig,
        *args: Any,
        compensation_rank: int | None = None,
        hessian_token_stride: int | None = None,
        diagonal_dampening: float | None = None,
        nm_selection: str | None = None,
        refinement_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        flat = {
            "compensation_rank": compensation_rank,
            "hessian_token_stride": hessian_token_stride,
            "diagonal_dampening": diagonal_dampening,
            "nm_selection": nm_selection,
            "refinement_steps": refinement_steps,
        }
        self.__dict__["_legacy_flat"] = flat
        init(self, *args, **kwargs)

    __init__.__doc__ = init.__doc__
    return __init__


MWandaConfig.__init__ = _with_legacy_keywords(MWandaConfig.__init__)  # type: ignore[method-assign]
for _name in _FLAT_UPDATE_FIELDS:
    setattr(MWandaConfig, _name, _legacy_reader(_name))


def resolve_config(
    config: PruningConfig, calibration_tokens: int | None = None, input_widths: Sequence[int] = ()
) -> PruningConfig:
    """``config.resolve(...)``: the frozen, fully explicit config a run uses and its report records."""
    return config.resolve(calibration_tokens, input_widths)


def _check_refinement_steps(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"refinement_steps must be a non-negative integer, got {value!r}")


def _check_nm_selection(value: Any) -> None:
    if value not in NM_SELECTIONS:
        raise ValueError(f"nm_selection must be one of {list(NM_SELECTIONS)}, got {value!r}")


def _check_diagonal_dampening(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"diagonal_dampening must be a finite number >= 0, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class _ConfigClasses(Mapping):
    """``{method: config class}`` read from the method registry (kept for older imports)."""

    def __getitem__(self, method: str) -> type[PruningConfig]:
        if method not in method_names():
            raise KeyError(method)
        return config_class_for_method(method)

    def __iter__(self):
        return iter(method_names())

    def __len__(self) -> int:
        return len(method_names())


_CONFIG_CLASSES: Mapping[str, type[PruningConfig]] = _ConfigClasses()


def config_class_for_method(method: str) -> type[PruningConfig]:
    """The config class registered for ``method`` (``"wanda"``, ``"sparsegpt"``, ``"mwanda"``, ...)."""
    return method_entry(method).config_class()
