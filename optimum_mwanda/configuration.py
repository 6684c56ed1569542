"""Pruning configurations: one dataclass per method, sharing :class:`PruningConfig`.

Configs are plain data. They validate themselves on construction (so a bad value fails before any model is
touched) and round-trip through ``to_dict``/``from_dict`` and JSON files with a version stamp.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .version import __version__

LAYERWISE_SCHEDULES = ("uniform", "depth", "owl", "cwl")
MEAN_COMPENSATIONS = ("language", "pooled", "none")
WEIGHT_UPDATES = ("closed_form", "sweep")
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


@dataclass
class PruningConfig:
    """Settings shared by every pruning method.

    Args:
        sparsity: fraction of weights set to zero in every pruned linear module, ``0 <= sparsity < 1``. With
            an ``N:M`` ``mask_structure`` it must equal ``1 - N/M``.
        mask_structure: ``"unstructured"`` (per output row) or ``"N:M"`` (``N`` kept in each group of ``M``).
        ignore: module-name patterns (``fnmatch`` globs or plain substrings) left dense. The LM head and the
            embeddings are never pruned.
        layerwise: per-layer sparsity schedule: ``"uniform"``, ``"depth"`` (rising linearly with depth),
            ``"owl"`` (outlier-weighted) or ``"cwl"`` (cross-lingual correlation, M-Wanda only). ``None``
            (the default) picks the method's default: ``"uniform"`` for Wanda and SparseGPT, ``"depth"`` for
            M-Wanda, and ``"uniform"`` whenever a non-uniform schedule is impossible (``N:M`` structure, or
            ``sparsity +/- layerwise_range`` outside ``[0, 1)``).
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

    sparsity: float = 0.5
    mask_structure: str = "unstructured"
    ignore: list[str] = field(default_factory=list)
    layerwise: str | None = None
    layerwise_range: float = 0.08
    owl_outlier_threshold: float = 5.0
    layerwise_samples_per_language: int | None = 2
    calibration_seq_len: int = 512
    samples_per_language: int = 8
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first invalid field."""
        self._validate_types()
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity must be a number, got {type(self.sparsity).__name__}")
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must satisfy 0 <= sparsity < 1, got {self.sparsity}")
        self.sparsity = float(self.sparsity)
        nm = parse_mask_structure(self.mask_structure)
        if self.layerwise is None:
            fits = 0 <= self.sparsity - self.layerwise_range and self.sparsity + self.layerwise_range < 1
            self.layerwise = self.default_layerwise if nm is None and fits else "uniform"
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
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        self.ignore = list(self.ignore)
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
                setattr(self, f.name, float(value))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")

    @property
    def nm_structure(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M structure, ``None`` when unstructured."""
        return parse_mask_structure(self.mask_structure)

    # -- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with ``method`` and the ``optimum_mwanda_version`` that wrote it."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["ignore"] = list(self.ignore)
        return {"method": self.method, **data, "optimum_mwanda_version": __version__}

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
        known = {f.name for f in dataclasses.fields(target)}
        if written_by_package:
            # A dict our own to_dict wrote before a field existed ran with that field's old behaviour, not
            # with today's default: rebuilding it must not claim a setting the run never had.
            data = {**target.fields_added_later, **data}
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


@dataclass
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


@dataclass
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
        for name in ("block_size", "hessian_token_stride"):
            _check_positive_int(name, getattr(self, name))
        _check_refinement_steps(self.refinement_steps)
        nm = self.nm_structure
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"block_size {self.block_size} must be a multiple of M={nm[1]}")
        if not self.dampening > 0:
            raise ValueError(f"dampening must be > 0, got {self.dampening}")
        _check_diagonal_dampening(self.diagonal_dampening)
        _check_nm_selection(self.nm_selection)


@dataclass
class MWandaConfig(WandaConfig):
    """M-Wanda: Wanda with language-aware statistics (Choenni & Titov, 2025). See ``docs/mwanda.md``.

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
            than ``"depth"`` overall on Gemma 3 270M, though best for Swahili): ``"specific"`` gives layers whose languages correlate less
            (language-specific layers) lower sparsity; ``"shared"`` does the opposite.
        mean_compensation: after masking, adjust each row's kept weights in closed form so that its expected
            output is restored: ``"language"`` in every calibration language at once (per-language input
            means), ``"pooled"`` on the all-language mean only, ``"none"`` leaves the kept weights as they
            were (Wanda). Pruned positions stay exactly zero. See
            :func:`optimum_mwanda.parts.mean_shift_compensation`.
        compensation_rank: restore more than the means: the compensation also keeps each row's output along
            the top ``compensation_rank`` principal directions of the pooled within-language input
            covariance (found from a randomized sketch collected in the same pass; ``0``: means only).
            Between the means-only update and SparseGPT's full-covariance one, at a per-row cost of one
            ``(L + r) x (L + r)`` solve. ``None`` (default) resolves to ``default_compensation_rank`` (32)
            with a compensation and to 0 with ``mean_compensation="none"``. See
            :func:`optimum_mwanda.parts.low_rank_compensation`.
        weight_update: how the kept weights are updated. ``"closed_form"``: the mask from the M-Wanda score,
            then the compensation above. ``"sweep"``: SparseGPT's column sweep, which chooses the mask while
            it updates the weights, on the input Hessian of every ``hessian_token_stride``-th calibration
            token (the score terms, ``mean_compensation`` and ``compensation_rank`` then do not apply). At
            ``N:M`` the mask is forced into every group, and only the sweep recovers what it removes
            (docs/mwanda.md, round 4); at high unstructured sparsity the sweep also beat the closed form on
            every language (round 10). ``None`` (default) resolves to ``"sweep"`` for an ``N:M``
            ``mask_structure`` or a ``sparsity`` of at least ``sweep_from_sparsity`` (0.65), and to
            ``"closed_form"`` otherwise, or when ``compensation_rank`` is given or
            ``mean_compensation="none"``.
        hessian_token_stride: with ``weight_update="sweep"``: the Hessian's token sample (``k``: every
            ``k``-th token of each sequence, ``1 / k`` of SparseGPT's statistics cost; see
            :class:`SparseGPTConfig`). ``None`` (default): per shared-input group, the largest stride up to
            ``max_hessian_token_stride`` (4) that leaves at least ``hessian_tokens_per_input`` (1.75) sampled
            tokens per input feature of the run's calibration tokens: 4 with 14336 or more tokens at
            ``in`` = 2048 (Gemma 3 270M's ``down_proj``), smaller for smaller calibration sets or wider
            inputs, down to every token.
        diagonal_dampening: shrink the input's second moment towards its diagonal, ``H + d * diag(H)``,
            so that the updates fitted to the calibration languages carry over to others: for the sweep,
            the Hessian (see :class:`SparseGPTConfig`); for the closed form, the compensation's modelled
            ``H`` (means, principal directions and within-language variance; see
            :func:`optimum_mwanda.parts.covariance_factors`), which changes the update but not the mask.
            ``None`` (default) resolves to ``default_diagonal_dampening`` (0.1) for the closed form, to
            ``sweep_diagonal_dampening`` (0.3) for the sweep, and to 0 with ``mean_compensation="none"``
            (no update to shrink).
        nm_selection: with ``weight_update="sweep"`` at ``N:M``: how the sweep chooses each group's pruned
            weights (see :class:`SparseGPTConfig`).
        refinement_steps: with ``weight_update="sweep"``: conjugate-gradient steps on the kept weights
            after the sweep, the mask fixed (see :class:`SparseGPTConfig`). ``None`` (default) resolves to
            ``default_refinement_steps`` (5) for the sweep and to 0 for the closed form, where it does not
            apply.
    """

    method: ClassVar[str] = "mwanda"
    allowed_layerwise: ClassVar[tuple[str, ...]] = LAYERWISE_SCHEDULES
    default_layerwise: ClassVar[str] = "depth"

    # Defaults are the best setting measured on Gemma 3 270M (benchmarks/results/multilingual_study.md):
    # per-language mean compensation is what beats Wanda, the depth schedule (default_layerwise) adds to
    # it; the variance term and CWL made perplexity worse there, so they are off unless asked for.
    variance_weight: float = 0.0
    activation_probability_weight: float = 0.25
    activation_threshold: float = 3.0
    cwl_protect: str = "specific"
    mean_compensation: str = "language"
    compensation_rank: int | None = None
    weight_update: str | None = None
    hessian_token_stride: int | None = None
    diagonal_dampening: float | None = None
    nm_selection: str = "greedy"
    refinement_steps: int | None = None

    #: ``compensation_rank=None`` resolves to this with a compensation (0 with ``mean_compensation="none"``):
    #: r = 32 measured best on Gemma 3 270M (docs/mwanda.md, round 3), at 1.13x Wanda's prune time.
    default_compensation_rank: ClassVar[int] = 32
    #: ``diagonal_dampening=None`` resolves to this for the closed form (two calibration seeds on Gemma 3
    #: 270M): 0.1 lowered 50% and 60% on both seeds and the absent languages at 70% by 2.7% (in-domain
    #: there within 0.2%) (docs/mwanda.md, rounds 8 and 9).
    default_diagonal_dampening: ClassVar[float] = 0.1
    #: ... and to this for the sweep. Unstructured, 0.3 was lower than 0.1 in-domain and on the absent
    #: languages at 60% and 70% on both seeds. With the refinement at N:M it cost 0.8-4.2% in-domain and
    #: took 1.6-9.4% off the absent languages (Turkish 3-21%) on all four 2:4 and 4:8 runs; it favours
    #: the languages not calibrated on (docs/mwanda.md, rounds 5, 9 and 10).
    sweep_diagonal_dampening: ClassVar[float] = 0.3
    #: ``weight_update=None`` resolves to the sweep at or above this unstructured sparsity (two calibration
    #: seeds, Gemma 3 270M; docs/mwanda.md, round 10). At 70% the sweep (shrunk by 0.3) was lower than the
    #: closed form in-domain and on the absent languages, and lower than Wanda on all 11 languages; at 65%
    #: it was 15% lower in-domain and 2-3% higher on the absent languages, but kept all 11 below Wanda
    #: where the closed form left Turkish above; at 60% it kept the in-domain gain, cost the absent
    #: languages 3.7%, and neither update kept Turkish below Wanda on both seeds.
    sweep_from_sparsity: ClassVar[float] = 0.65
    #: ``refinement_steps=None`` resolves to this for the sweep: on Gemma 3 270M at 2:4 five steps took the
    #: sweep from 141.7 / 142.4 to 118.3 / 118.3 in-domain (two calibration seeds; SparseGPT 136.0 / 137.4)
    #: and lowered the absent languages too (docs/mwanda.md, round 7).
    default_refinement_steps: ClassVar[int] = 5
    #: ``hessian_token_stride=None``: the largest stride up to this ... (on Gemma 3 270M every 8th token
    #: cost the N:M sweep 0.6-4.3% in-domain against every 4th on all four runs, to save an estimated 3-6%
    #: of the prune time)
    max_hessian_token_stride: ClassVar[int] = 4
    #: ... that leaves the Hessian this many sampled tokens per input feature: 1.75 per input (every 4th of
    #: 7 x 4 x 512 tokens at in = 2048) was within 2% of every token, 0.875 lost a quarter
    #: (docs/mwanda.md, rounds 4 and 6).
    hessian_tokens_per_input: ClassVar[float] = 1.75
    fields_added_later: ClassVar[dict[str, Any]] = {
        "mean_compensation": "none",
        "compensation_rank": 0,
        "weight_update": "closed_form",
        "diagonal_dampening": 0.0,
        "nm_selection": "greedy",
        "refinement_steps": 0,
    }
    #: extra columns of the randomized sketch beyond ``compensation_rank`` (accuracy of the directions)
    sketch_oversampling: ClassVar[int] = 16

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
        if self.weight_update is None:
            # An explicit compensation_rank asks for the closed-form compensation, and without a
            # compensation the kept weights stay as they are.
            forced = self.nm_structure is not None or self.sparsity >= self.sweep_from_sparsity
            updates = self.mean_compensation != "none" and self.compensation_rank is None
            self.weight_update = "sweep" if forced and updates else "closed_form"
        if self.weight_update not in WEIGHT_UPDATES:
            raise ValueError(
                f"weight_update must be one of {list(WEIGHT_UPDATES)}, got {self.weight_update!r}"
            )
        if self.hessian_token_stride is not None:
            _check_positive_int("hessian_token_stride", self.hessian_token_stride)
        sweep = self.weight_update == "sweep"
        if sweep and self.mean_compensation == "none":
            raise ValueError(
                'weight_update="sweep" updates the kept weights; mean_compensation="none" asks to keep them'
            )
        if self.compensation_rank is None:
            closed_form = self.mean_compensation != "none" and not sweep
            self.compensation_rank = self.default_compensation_rank if closed_form else 0
        rank = self.compensation_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"compensation_rank must be a non-negative integer, got {rank!r}")
        if rank and self.mean_compensation == "none":
            raise ValueError(
                'compensation_rank > 0 needs a compensation: mean_compensation "language" or "pooled"'
            )
        nm = self.nm_structure
        if sweep and nm is not None and SparseGPTConfig.block_size % nm[1]:
            raise ValueError(
                f'weight_update="sweep" needs M dividing its block of {SparseGPTConfig.block_size} columns, '
                f"got {self.mask_structure}"
            )
        if rank and sweep:
            raise ValueError('compensation_rank > 0 applies to weight_update="closed_form", not "sweep"')
        if self.diagonal_dampening is None:
            if sweep:
                self.diagonal_dampening = self.sweep_diagonal_dampening
            elif self.mean_compensation != "none":
                self.diagonal_dampening = self.default_diagonal_dampening
            else:
                self.diagonal_dampening = 0.0
        _check_diagonal_dampening(self.diagonal_dampening)
        if self.diagonal_dampening and not sweep and self.mean_compensation == "none":
            raise ValueError('diagonal_dampening shrinks the compensation; mean_compensation="none" has none')
        _check_nm_selection(self.nm_selection)
        if self.refinement_steps is None:
            self.refinement_steps = self.default_refinement_steps if sweep else 0
        _check_refinement_steps(self.refinement_steps)
        if self.refinement_steps and not sweep:
            raise ValueError('refinement_steps applies to weight_update="sweep", not "closed_form"')


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


_CONFIG_CLASSES: dict[str, type[PruningConfig]] = {
    cls.method: cls for cls in (WandaConfig, SparseGPTConfig, MWandaConfig)
}


def config_class_for_method(method: str) -> type[PruningConfig]:
    """The config class registered for ``method`` (``"wanda"``, ``"sparsegpt"`` or ``"mwanda"``)."""
    try:
        return _CONFIG_CLASSES[method]
    except KeyError:
        raise ValueError(
            f"unknown pruning method {method!r}; choose one of {sorted(_CONFIG_CLASSES)}"
        ) from None
