"""Running statistics of a linear module's input, accumulated over calibration tokens.

Pure tensor code: callers hand in ``x`` as ``[tokens, in_features]`` (padding already removed) with the
language index of every token. Sums are accumulated in float64 (so that data-parallel ranks add up to a
single process's result) and normalised per token when read.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


def language_runs(
    language: torch.Tensor, sequence_lengths: int | list[int] | None = None
) -> list[tuple[int, int, int]]:
    """``(start, end, language)`` of every maximal run of same-language tokens, never across a sequence
    boundary (``sequence_lengths`` as in :meth:`FeatureStatistics.update`; ``None``: one sequence).

    A calibration sequence is one language, so a batch of ``B`` sequences has ``B`` runs.
    """
    lengths = [language.numel()] if sequence_lengths is None else sequence_lengths
    runs: list[tuple[int, int, int]] = []
    start = 0
    for part in language.split(lengths):
        if part.numel() == 0:
            continue
        changes = (part[1:] != part[:-1]).nonzero().flatten().tolist()
        edges = [0, *(c + 1 for c in changes), part.numel()]
        values = part[edges[:-1]].tolist()
        runs += [(start + a, start + b, v) for a, b, v in zip(edges, edges[1:], values)]
        start += part.numel()
    return runs


def _add_runs(total: torch.Tensor, values: torch.Tensor, runs: list[tuple[int, int, int]]) -> None:
    """``total[l] += sum of the rows of values in each run of language l``.

    Each run is summed on its own in float32 (PyTorch's cascaded summation; booleans are counted exactly
    in int32) and the run sums are added in float64 with one ``index_add_``, as the covariance sketch and
    the Hessian add their per-sequence float32 products. A run's sum depends only on its own tokens, so the
    result does not depend on how sequences are batched or sharded over ranks. Against a float64 copy of
    every run (rounds 1-10) this is about 5x faster on CPU for the same batch independence; the float32
    run sums are accurate to a few float32 ulps, and every consumer reads the statistics in float32.
    """
    if values.dtype == torch.bool:
        sums = [values[a:b].sum(dim=0, dtype=torch.int32) for a, b, _ in runs]
    else:
        sums = [values[a:b].sum(dim=0) for a, b, _ in runs]
    index = torch.tensor([language for _, _, language in runs], device=total.device)
    total.index_add_(0, index, torch.stack(sums).double())


class FeatureStatistics:
    """Per-language sums of squares (norms), token counts and, optionally, sums and activation counts.

    ``pooled_norm`` is Wanda's ``||X_j||`` up to a constant per-token scale, which leaves the per-row ranking
    of scores unchanged: ``sqrt(sum_t x_tj^2 / T)``.
    """

    def __init__(
        self,
        in_features: int,
        num_languages: int,
        device: torch.device | str = "cpu",
        track_activation: bool = False,
        activation_threshold: float = 1.0,
        track_mean: bool = False,
        sketch_width: int = 0,
    ):
        def zeros() -> torch.Tensor:
            return torch.zeros(num_languages, in_features, dtype=torch.float64, device=device)

        self.sum_squares = zeros()
        self.tokens = torch.zeros(num_languages, dtype=torch.float64, device=device)
        self.active = zeros() if track_activation else None
        self.activation_threshold = activation_threshold
        self.sum = zeros() if track_mean else None
        self.sketch = CovarianceSketch(in_features, sketch_width, device=device) if sketch_width else None
        #: where the statistic was made and is used
        self.home = torch.device(device)

    def update(
        self, x: torch.Tensor, language: torch.Tensor, sequence_lengths: int | list[int] | None = None
    ) -> None:
        """Add tokens ``x`` (``[T, in]``) whose languages are ``language`` (``LongTensor[T]``).

        ``sequence_lengths``: when ``x`` is whole sequences back to back, their token counts (one int when
        all are equal); the sketch is then summed per sequence, so its value does not depend on how
        sequences are grouped into batches or data-parallel ranks.
        """
        if x.shape[0] == 0:
            return
        x = x.to(device=self.sum_squares.device, dtype=torch.float32)
        language = language.to(self.sum_squares.device)
        # Non-finite inputs are not checked here (a full pass per update): NaN/inf propagate into the
        # sums, which the pruner checks once before scoring.
        squares = x * x
        runs = language_runs(language, sequence_lengths)
        _add_runs(self.sum_squares, squares, runs)
        self.tokens.index_add_(0, language, torch.ones_like(language, dtype=torch.float64))
        if self.sum is not None:
            _add_runs(self.sum, x, runs)
        if self.sketch is not None:
            self.sketch.update(x, sequence_lengths)
        if self.active is not None:
            # A feature is active on a token when it stands out from that token's typical magnitude:
            # |x_tj| > threshold * rms(x_t). Relative to the token so that scale differences between
            # tokens and layers do not decide activity. (A per-token quantity: independent of batching.)
            # Compared on the squares already computed (x_tj^2 > threshold^2 * mean_j x_tj^2, the same
            # test for non-negative sides): no |x| and no square root over the batch.
            bound = squares.mean(dim=1, keepdim=True) * (self.activation_threshold**2)
            _add_runs(self.active, squares > bound, runs)

    def raw_sums(self) -> dict[str, torch.Tensor]:
        """The raw (un-normalised, float64) accumulators by name: adding two statistics' raw sums gives the
        statistic of both token sets together."""
        sums = {"sum_squares": self.sum_squares, "tokens": self.tokens}
        if self.sum is not None:
            sums["sum"] = self.sum
        if self.active is not None:
            sums["active"] = self.active
        if self.sketch is not None:
            sums["sketch"] = self.sketch.sketch
        return sums

    def load_raw_sums(self, sums: dict[str, torch.Tensor]) -> None:
        """Replace the accumulators with ``sums`` (same names and shapes as :meth:`raw_sums`)."""
        _load_sums(self.raw_sums(), sums)

    def offload_(self) -> None:
        """Move the accumulators to the CPU (between accumulation and use); :meth:`restore_` brings them
        back to the device they were made on."""
        self.to_("cpu")

    def restore_(self) -> None:
        self.to_(self.home)

    def to_(self, device: torch.device | str) -> FeatureStatistics:
        """Move the accumulators to ``device``."""
        for name in ("sum_squares", "tokens", "active", "sum"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.sketch is not None:
            self.sketch.test_matrix = self.sketch.test_matrix.to(device)
            self.sketch.sketch = self.sketch.sketch.to(device)
        return self

    @property
    def pooled_norm(self) -> torch.Tensor:
        """``[in]``: root-mean-square activation over all tokens of all languages."""
        total = self.tokens.sum().clamp_min(1.0)
        return (self.sum_squares.sum(dim=0) / total).sqrt().float()

    @property
    def language_norms(self) -> torch.Tensor:
        """``[L, in]``: root-mean-square activation per language."""
        return (self.sum_squares / self._per_language_count()).sqrt().float()

    @property
    def language_shares(self) -> torch.Tensor:
        """``[L]``: share of the calibration tokens in each language (zeros when there were none)."""
        total = self.tokens.sum()
        return self.tokens / total if total > 0 else torch.zeros_like(self.tokens)

    @property
    def language_means(self) -> torch.Tensor:
        """``[L, in]``: mean activation per language."""
        if self.sum is None:
            raise RuntimeError("means were not tracked for this statistic")
        return (self.sum / self._per_language_count()).float()

    @property
    def language_second_moments(self) -> torch.Tensor:
        """``[L, in]``: mean squared activation per language."""
        return (self.sum_squares / self._per_language_count()).float()

    @property
    def pooled_mean(self) -> torch.Tensor:
        """``[1, in]``: mean activation over all tokens of all languages."""
        if self.sum is None:
            raise RuntimeError("means were not tracked for this statistic")
        return (self.sum.sum(dim=0) / self.tokens.sum().clamp_min(1.0)).unsqueeze(0).float()

    @property
    def pooled_second_moment(self) -> torch.Tensor:
        """``[1, in]``: mean squared activation over all tokens of all languages."""
        return (self.sum_squares.sum(dim=0) / self.tokens.sum().clamp_min(1.0)).unsqueeze(0).float()

    @property
    def activation_probability(self) -> torch.Tensor:
        """``[L, in]``: share of each language's tokens on which a feature is active."""
        if self.active is None:
            raise RuntimeError("activation probability was not tracked for this statistic")
        return (self.active / self._per_language_count()).float()

    def _per_language_count(self) -> torch.Tensor:
        return self.tokens.clamp_min(1.0).unsqueeze(1)


# Consecutive calibration sequences whose tokens may share one float32 X^T X product, at most. A product
# of one short sequence (128 tokens: every 4th of 512) costs as much to add into the float64 sum as to
# compute, so HessianStatistics joins the sequences of a group into one product, and data-parallel ranks
# are dealt whole groups (distributed.shard_sequences): every rank forms exactly the products one process
# forms, and only their float64 addition order differs. On Gemma 3 270M's shapes (56 x 128 sampled
# tokens) the products of groups of 7 take about 0.37 s a layer against 0.59 s for one float64 product
# per sequence (research/results/hessian_groups.md).
MAX_SEQUENCE_GROUP = 8


def sequence_group_for(sequences: int) -> int:
    """Sequences per Hessian product group for a calibration set of ``sequences``: an eighth of the set,
    from 1 to :data:`MAX_SEQUENCE_GROUP`. It depends on the set only, never on the number of ranks, so a
    data-parallel run forms the products of one process; with at least 8 groups in a set, up to 8 ranks
    all get a share, within one group of each other."""
    if sequences < 0:
        raise ValueError(f"sequences must be >= 0, got {sequences}")
    return max(1, min(MAX_SEQUENCE_GROUP, sequences // 8))


# Inside a group, sequences are joined only until this many tokens, so a group of long sequences is
# never held at once (each of 8 x 2048-token sequences, sampled every 4th token, is its own product).
MAX_GROUP_TOKENS = 1024

# Below this many tokens a part's X^T X goes straight into the float64 sum (HessianStatistics.update);
# measured crossover on a 2-core CPU: about 200 tokens at in = 2048.
_FUSED_FLOAT64_ROWS = 192

# X^T X is symmetric, so only its lower triangle is accumulated, as a staircase of this many row blocks
# (block k: its rows times the columns up to the block's end). Four blocks do 5/8 of the full product's
# flops; on a 2-core CPU they cut the time of a 128-token part by 35% (in = 2048) and, for a 512-token
# float32 part, also half of the in x in float64 addition: about 2x.
_GRAM_ROW_BLOCKS = 4


def add_lower_gram(total: torch.Tensor, part: torch.Tensor) -> None:
    """Add the lower triangle of ``part^T part`` (``part``: ``[tokens, n]``) to ``total`` (float64, or
    float32: then every part goes through fused float32 ``addmm`` calls).

    Entries above the diagonal of the staircase's off-diagonal blocks are left untouched: read the sum
    through :func:`symmetric_from_lower`. A part below ``_FUSED_FLOAT64_ROWS`` tokens goes through fused
    float64 ``addmm`` calls (adding a float32 product would cost as much as computing it); a longer one is
    multiplied in float32 and added. The result depends only on ``part`` itself.
    """
    fused = part.shape[0] < _FUSED_FLOAT64_ROWS or total.dtype == torch.float32
    part = part.to(total.dtype) if fused else part.float()
    n = part.shape[1]
    edges = [n * k // _GRAM_ROW_BLOCKS for k in range(_GRAM_ROW_BLOCKS + 1)]
    for start, end in zip(edges, edges[1:]):
        if end == start:
            continue
        target = total[start:end, :end]
        if fused:
            target.addmm_(part[:, start:end].t(), part[:, :end])
        else:
            target.add_(part[:, start:end].t() @ part[:, :end])


def symmetric_from_lower(total: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is that of ``total``."""
    return torch.tril(total) + torch.tril(total, -1).t()


# Rows per block when hessian_from_lower_sum mirrors the lower triangle: temporaries of this many rows only.
_MIRROR_BLOCK = 512


def hessian_from_lower_sum(
    total: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``scale * symmetric_from_lower(total)`` in float32, built block by block: the only ``n x n``
    allocation is the result (``out`` when given, which may be ``total`` itself when that is float32),
    against three float64 temporaries for the plain expression (26 GB for a 70B ``down_proj``)."""
    n = total.shape[0]
    if out is None:
        out = torch.empty(n, n, dtype=torch.float32, device=total.device)
    # Scale the lower triangle (in the accumulator's precision) into the result, one row block at a time,
    # then copy each block's columns below the diagonal block into the rows above it.
    for start in range(0, n, _MIRROR_BLOCK):
        end = min(start + _MIRROR_BLOCK, n)
        rows = total[start:end, :end]
        out[start:end, :end] = rows * scale if rows.dtype == torch.float32 else (rows * scale).float()
    for start in range(0, n, _MIRROR_BLOCK):
        end = min(start + _MIRROR_BLOCK, n)
        block = out[start:end, start:end]
        block.copy_(torch.tril(block) + torch.tril(block, -1).t())
        out[start:end, end:] = out[end:, start:end].t()
    return out


def hessian_token_stride_for(
    tokens: int, in_features: int, max_stride: int = 4, tokens_per_input: float = 1.75
) -> int:
    """The largest token stride, up to ``max_stride``, that still leaves the Hessian of an ``in_features``
    input at least ``tokens_per_input * in_features`` of the ``tokens`` calibration tokens (at least 1).

    On Gemma 3 270M a sample of 1.75 tokens per input (every 4th of 7 x 4 x 512 tokens at ``in`` = 2048)
    was within 2% of SparseGPT's every-token sweep at 2:4, while 0.875 per input lost a quarter
    (docs/mwanda.md, rounds 4 and 6). Exact arithmetic, so that the boundary case is the same on every
    machine and rank.
    """
    if tokens < 0 or in_features < 1 or max_stride < 1 or not tokens_per_input > 0:
        raise ValueError(
            f"invalid arguments: tokens={tokens}, in_features={in_features}, max_stride={max_stride}, "
            f"tokens_per_input={tokens_per_input}"
        )
    ratio = Fraction(tokens) / (Fraction(tokens_per_input) * in_features)
    return max(1, min(max_stride, math.floor(ratio)))


class HessianStatistics:
    """``H = 2 X^T X / T`` for SparseGPT's sweep (float32 products of sequence groups summed in float64),
    optionally with Wanda-style feature norms.

    The accumulator holds the lower triangle of ``X^T X`` only (:func:`add_lower_gram`); read ``H`` through
    :attr:`hessian` (or :meth:`release_hessian`, which frees the accumulator).

    Sequences are multiplied in groups: the (sampled) tokens of ``sequence_group`` consecutive sequences
    are joined, up to ``MAX_GROUP_TOKENS`` tokens, into one float32 product, which is added into the sum.
    Groups are counted from the first sequence the statistic sees, so a caller feeding a data-parallel
    shard must hand it whole groups (``distributed.shard_sequences(..., group_size=sequence_group)``):
    then every rank forms the very products one process forms, whatever the batch size, and the sums
    differ only in the order of their float64 additions.

    Args:
        token_stride: build ``H`` from every ``token_stride``-th token of each sequence only (its first
            valid token, then every ``token_stride``-th after it): ``1 / token_stride`` of the cost of the
            ``in x in`` products, which dominate SparseGPT's statistics pass. The feature norms always see
            every token. Counting from each sequence's start keeps the sample independent of batching.
        track_norms: also keep :class:`FeatureStatistics` norms of every token in ``features`` (``None``
            otherwise). The sweep reads only ``H``, and the norms cost a pass over every token in float64
            (about a fifth of the statistics' own time at Gemma 3 270M's shapes), so they are off unless a
            caller asks.
        sequence_group: consecutive sequences per product (:func:`sequence_group_for`; ``1``: one
            product per sequence).
        dtype: the accumulator's dtype. ``torch.float64`` (the default): the groups' float32 products are
            added in float64, so the sum does not depend on how whole groups are batched or sharded over
            data-parallel ranks. ``torch.float32``: half the memory (``in^2 * 4`` bytes instead of 8: 0.8
            instead of 1.6 GB for an 8B ``down_proj``), and :meth:`release_hessian` turns the sum into
            ``H`` in place with no second ``in x in`` matrix. Groups are still added one at a time in
            their order, so the sum does not depend on the batch size; it does depend, at float32 rounding
            (about 1e-7 relative), on how groups are split over ranks, whose partial sums are added in
            another order.
    """

    def __init__(
        self,
        in_features: int,
        num_languages: int,
        device: torch.device | str = "cpu",
        token_stride: int = 1,
        track_norms: bool = False,
        dtype: torch.dtype = torch.float64,
        sequence_group: int = 1,
    ):
        if token_stride < 1:
            raise ValueError(f"token_stride must be >= 1, got {token_stride}")
        if sequence_group < 1:
            raise ValueError(f"sequence_group must be >= 1, got {sequence_group}")
        self.sequence_group = sequence_group
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the Hessian accumulates in float32 or float64, not {dtype}")
        self.token_stride = token_stride
        self._sum: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.token_count = torch.zeros(1, dtype=torch.float64, device=device)
        self.features = FeatureStatistics(in_features, num_languages, device=device) if track_norms else None
        self._hessian: torch.Tensor | None = None
        # The current group's sequences not multiplied yet, and how far into the group the last one was.
        self._pending: list[torch.Tensor] = []
        self._group_position = 0
        #: where the statistic was made and ``H`` is used
        self.home = torch.device(device)

    @property
    def hessian_sum(self) -> torch.Tensor | None:
        """The accumulated lower triangle of ``X^T X`` (every sequence seen so far), ``None`` once released."""
        return None if self._sum is None else self._accumulator()

    @property
    def count(self) -> int:
        """Tokens in ``H`` (every ``token_stride``-th of each sequence)."""
        return int(self.token_count.item())

    @property
    def hessian(self) -> torch.Tensor:
        """``[in, in]`` float32: ``2 X^T X / T`` over the (sampled) tokens seen so far."""
        if self._hessian is None:
            self._hessian = hessian_from_lower_sum(self._accumulator(), 2.0 / max(self.count, 1))
        return self._hessian

    def release_hessian(self) -> torch.Tensor:
        """:attr:`hessian` on the statistic's :attr:`home` device, freeing the accumulator (no further
        updates): the caller owns ``H`` and may overwrite it. A float32 accumulator becomes ``H`` in place
        (no second ``in x in``); an offloaded one is turned into ``H`` on the CPU, and only the float32
        ``H`` goes back to the device."""
        if self._hessian is None:
            total = self._accumulator()
            scale = 2.0 / max(self.count, 1)
            if total.dtype == torch.float32:
                self._hessian = hessian_from_lower_sum(total, scale, out=total)
            else:
                self._hessian = hessian_from_lower_sum(total, scale)
        self._sum = None
        hessian, self._hessian = self._hessian, None
        return hessian.to(self.home)

    def offload_(self) -> None:
        """Move the accumulators to the CPU between accumulation and use. The float64 sum stays there:
        :meth:`release_hessian` makes ``H`` on the CPU and sends only that back to :attr:`home`."""
        self.to_("cpu")

    def restore_(self) -> None:
        """Nothing to move back before :meth:`release_hessian` (which delivers ``H`` to :attr:`home`)."""
        if self.features is not None:
            self.features.restore_()

    def to_(self, device: torch.device | str) -> HessianStatistics:
        """Move the accumulators to ``device`` (:attr:`home`, where ``H`` is delivered, stays)."""
        if self._sum is not None:
            self._sum = self._accumulator().to(device)
        if self._hessian is not None:
            self._hessian = self._hessian.to(device)
        self.token_count = self.token_count.to(device)
        if self.features is not None:
            self.features.to_(device)
        return self

    def _accumulator(self) -> torch.Tensor:
        if self._sum is None:
            raise RuntimeError("the Hessian was released: this statistic takes no more updates")
        self._flush()
        return self._sum

    def _flush(self) -> None:
        """Multiply the pending sequences into the sum (the group goes on: its position is kept)."""
        if self._pending:
            assert self._sum is not None
            part = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
            self._pending = []
            add_lower_gram(self._sum, part)

    def update(
        self, x: torch.Tensor, language: torch.Tensor, sequence_lengths: int | list[int] | None = None
    ) -> None:
        """Add tokens ``x`` (``[T, in]``); arguments as in :meth:`FeatureStatistics.update` (without
        lengths, each chunk of ``CovarianceSketch.default_chunk`` tokens counts as a sequence)."""
        if self._sum is None:
            raise RuntimeError("the Hessian was released: this statistic takes no more updates")
        if x.shape[0] == 0 and not isinstance(sequence_lengths, list):
            return
        # (A batch whose sequences have no tokens left, all padding, still counts them, given as zero
        # lengths, so that the groups stay those of any other batching.)
        if self.features is not None and x.shape[0]:
            self.features.update(x, language, sequence_lengths)
        x = x.to(device=self._sum.device, dtype=torch.float32)
        # Whole sequences go into a group's product, and a group ends after sequence_group sequences or at
        # MAX_GROUP_TOKENS tokens: both depend only on the sequences themselves and their place in the
        # stream, never on the batch. add_lower_gram picks a fused float64 product for a part shorter
        # than _FUSED_FLOAT64_ROWS and a float32 product added in float64 otherwise; a float32
        # accumulator takes fused float32 products.
        for part in x.split(sequence_lengths or CovarianceSketch.default_chunk):
            if self.token_stride > 1:
                part = part[:: self.token_stride]
            self.token_count += part.shape[0]
            if part.shape[0]:
                self._pending.append(part)
            self._group_position = (self._group_position + 1) % self.sequence_group
            if self._group_position == 0 or sum(p.shape[0] for p in self._pending) >= MAX_GROUP_TOKENS:
                self._flush()
        if self._pending:
            # The waiting tokens (under MAX_GROUP_TOKENS) are views into this batch: copy them out, so that
            # the batch's activations are not kept alive until the group's product.
            self._pending = [torch.cat(self._pending)]
        self._hessian = None

    def raw_sums(self) -> dict[str, torch.Tensor]:
        """Raw float64 accumulators (see :meth:`FeatureStatistics.raw_sums`)."""
        sums = {"hessian_sum": self._accumulator(), "token_count": self.token_count}
        if self.features is not None:
            sums.update({f"features.{k}": v for k, v in self.features.raw_sums().items()})
        return sums

    def load_raw_sums(self, sums: dict[str, torch.Tensor]) -> None:
        _load_sums(self.raw_sums(), sums)
        self._hessian = None


def _load_sums(current: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]) -> None:
    if set(sums) != set(current):
        raise ValueError(f"raw sums {sorted(sums)} do not match this statistic's {sorted(current)}")
    for name, tensor in current.items():
        if sums[name].shape != tensor.shape:
            raise ValueError(
                f"raw sum {name!r} has shape {tuple(sums[name].shape)}, not {tuple(tensor.shape)}"
            )
        tensor.copy_(sums[name])


class CovarianceSketch:
    """A single-pass randomized sketch ``Y = sum_t x_t (x_t^T Omega)`` of the input's second moment.

    ``Omega`` is a fixed Gaussian test matrix (``[in, width]``, seeded, so every run and every process
    builds the same one). From ``Y`` and the per-language means, :meth:`principal_directions` recovers the
    top principal directions of the pooled within-language covariance by the Nystrom approximation: the
    cost is ``2 * in * width`` flops per token instead of a full ``in x in`` Gram matrix (SparseGPT's
    Hessian), and nothing ``in x in`` is ever stored.
    """

    def __init__(self, in_features: int, width: int, device: torch.device | str = "cpu", seed: int = 0):
        generator = torch.Generator().manual_seed(seed + 7919 * in_features)
        self.test_matrix = torch.randn(in_features, width, generator=generator).to(device)
        self.sketch = torch.zeros(in_features, width, dtype=torch.float64, device=device)

    #: tokens per float32 product when the caller gives no sequence length
    default_chunk: int = 512

    def update(self, x: torch.Tensor, sequence_lengths: int | list[int] | None = None) -> None:
        """Add float32 tokens ``x`` (``[T, in]``), one product per sequence (``sequence_lengths`` as in
        :meth:`FeatureStatistics.update`; ``None``: chunks of ``default_chunk`` tokens)."""
        # A float32 product summed over a batch depends on which tokens share the batch. Each chunk's
        # product depends only on its own tokens, and the float64 sum of chunks is (to far below float32
        # precision) independent of their order, so when chunks are whole sequences a data-parallel run
        # reproduces a single process bit for bit, as the float64 sums of the other statistics do. A float64
        # product would do the same at 3-5x the cost of this statistic on CPU.
        for part in x.split(sequence_lengths or self.default_chunk):
            self.sketch.add_(part.t() @ (part @ self.test_matrix))

    def principal_directions(
        self, tokens: float, means: torch.Tensor, shares: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(directions [in, r], eigenvalues [r])`` of ``C = Y / T - sum_l pi_l mu_l mu_l^T``,
        the pooled within-language covariance, ``r = min(rank, width)``."""
        omega = self.test_matrix.double()
        means = means.double()
        # C Omega from the sketch of the uncentred second moment and the means.
        y = self.sketch / max(float(tokens), 1.0) - means.t() @ (
            shares.double().unsqueeze(1) * (means @ omega)
        )
        # Stable Nystrom (Tropp et al., 2017): shift by a tiny nu so the small core is positive definite.
        nu = 1e-10 * float(torch.linalg.matrix_norm(y)) + 1e-30
        y = y + nu * omega
        core = omega.t() @ y
        core = 0.5 * (core + core.t())
        eigenvalues, eigenvectors = torch.linalg.eigh(core)
        # Pseudo-inverse square root of the core (robust where C is numerically indefinite).
        keep = eigenvalues > eigenvalues.max() * 1e-12
        factor = y @ (eigenvectors[:, keep] / eigenvalues[keep].sqrt())
        directions, singular, _ = torch.linalg.svd(factor, full_matrices=False)
        values = (singular.pow(2) - nu).clamp_min(0.0)
        r = min(rank, values.numel())
        return directions[:, :r].float(), values[:r].float()
