"""Cutting a token stream into scoring windows (pure functions, no model).

A window holds at most ``seq_len`` tokens: an optional BOS token followed by a span ``[begin, end)`` of the
stream. Only the tokens ``[score_from, end)`` are scored, so with a ``stride`` shorter than the span length
consecutive windows overlap and every token is scored once, with up to ``seq_len`` tokens of context
(standard sliding-window perplexity). The BOS token is context only and never scored; without BOS the
first token of a window has no context and is scored by no window unless an overlap covers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass(frozen=True)
class WindowSpan:
    """One window over a token stream: tokens ``[begin, end)`` enter the model, ``[score_from, end)`` count."""

    begin: int
    end: int
    score_from: int

    @property
    def scored_tokens(self) -> int:
        return self.end - self.score_from


def window_capacity(seq_len: int, with_bos: bool) -> int:
    """Stream tokens per window: ``seq_len`` minus the BOS slot."""
    return seq_len - 1 if with_bos else seq_len


def plan_windows(
    num_tokens: int,
    seq_len: int,
    stride: int | None = None,
    with_bos: bool = True,
    max_windows: int | None = None,
) -> list[WindowSpan]:
    """Plan the windows over a stream of ``num_tokens`` tokens.

    Args:
        num_tokens: stream length.
        seq_len: model input length per window, BOS included.
        stride: tokens between window starts; ``None`` means non-overlapping (the window capacity). Must
            satisfy ``1 <= stride <= capacity`` so no token is skipped.
        with_bos: whether a BOS token takes the first slot of every window.
        max_windows: keep only the first ``max_windows`` windows.

    The last window may be shorter than the others; it is kept so every token is scored (it is padded when
    batched, and padding is never scored). Windows that would score nothing are left out.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a context token and a scored token), got {seq_len}")
    capacity = window_capacity(seq_len, with_bos)
    if stride is None:
        stride = capacity
    if not 1 <= stride <= capacity:
        raise ValueError(
            f"stride must be between 1 and {capacity} (tokens per window{' after BOS' if with_bos else ''}), "
            f"got {stride}: a larger stride would leave tokens unscored"
        )
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be a positive integer or None, got {max_windows}")
    first_scorable = 0 if with_bos else 1  # without BOS the first token of a window has no context
    spans: list[WindowSpan] = []
    scored_until = 0
    begin = 0
    while begin < num_tokens:
        end = min(begin + capacity, num_tokens)
        score_from = max(scored_until, begin + first_scorable)
        if end > score_from:
            spans.append(WindowSpan(begin, end, score_from))
            if max_windows is not None and len(spans) == max_windows:
                break
        scored_until = max(scored_until, end)
        if end == num_tokens:
            break
        begin += stride
    return spans


def window_batch(
    stream: torch.Tensor,
    spans: Sequence[WindowSpan],
    bos_token_id: int | None,
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build ``(input_ids, attention_mask, labels)`` for a batch of windows, right-padded.

    ``labels`` follow the transformers convention (the token itself at its own position, shifted inside the
    loss) with ``-100`` on BOS, on unscored context tokens and on padding. Right padding keeps real tokens'
    positions and, under causal attention, no real token can see a pad.
    """
    if not spans:
        raise ValueError("window_batch needs at least one window")
    offset = 0 if bos_token_id is None else 1
    length = max(span.end - span.begin for span in spans) + offset
    input_ids = torch.full((len(spans), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(spans), length), dtype=torch.long)
    labels = torch.full((len(spans), length), IGNORE_INDEX, dtype=torch.long)
    for row, span in enumerate(spans):
        size = span.end - span.begin + offset
        if bos_token_id is not None:
            input_ids[row, 0] = bos_token_id
        input_ids[row, offset:size] = stream[span.begin : span.end]
        attention_mask[row, :size] = 1
        first_label = offset + span.score_from - span.begin
        labels[row, first_label:size] = input_ids[row, first_label:size]
    return input_ids, attention_mask, labels
