"""The calibration set: token ids with one language tag per sequence."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .languages import normalize_language_tag


@dataclass
class CalibrationSet:
    """Calibration sequences ready for the pruner.

    Attributes:
        input_ids: ``LongTensor[n, seq_len]``.
        attention_mask: ``LongTensor[n, seq_len]``; ``0`` marks padding, which never reaches the statistics.
        languages: the language tag of each of the ``n`` sequences: BCP-47, validated and normalised on
            construction (``"EN"`` and ``"en"`` are one language), so a bad tag fails before any pruning.
        sources: optional ``{language: source name}`` (corpus names, used in reports and model cards).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    languages: list[str]
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.input_ids, torch.Tensor) or self.input_ids.dim() != 2:
            raise ValueError("CalibrationSet.input_ids must be a 2-D LongTensor [n_sequences, seq_len]")
        if self.input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"CalibrationSet.input_ids must hold integer token ids, got {self.input_ids.dtype}"
            )
        self.input_ids = self.input_ids.long()
        if self.attention_mask is None:
            self.attention_mask = torch.ones_like(self.input_ids)
        if self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(self.attention_mask.shape)} differs from input_ids shape "
                f"{tuple(self.input_ids.shape)}"
            )
        self.attention_mask = self.attention_mask.long()
        self.languages = _normalize_tags(self.languages, "CalibrationSet.languages")
        self.sources = dict(
            zip(_normalize_tags(self.sources, "CalibrationSet.sources"), self.sources.values())
        )
        if len(self.languages) != self.input_ids.shape[0]:
            raise ValueError(
                f"{len(self.languages)} language tags for {self.input_ids.shape[0]} calibration sequences"
            )
        if self.input_ids.shape[0] == 0 or self.input_ids.shape[1] == 0:
            raise ValueError("the calibration set is empty: give at least one non-empty sequence")
        empty = [lang for lang, count in self.token_counts.items() if count == 0]
        if empty:
            raise ValueError(f"calibration language(s) {empty} have no (non-padding) tokens")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def language_list(self) -> list[str]:
        """Languages in order of first appearance."""
        return list(dict.fromkeys(self.languages))

    @property
    def token_counts(self) -> dict[str, int]:
        """Non-padding tokens per language."""
        counts = self.attention_mask.sum(dim=1).tolist()
        totals: dict[str, int] = {lang: 0 for lang in self.language_list}
        for lang, count in zip(self.languages, counts):
            totals[lang] += int(count)
        return totals

    @property
    def language_index(self) -> torch.Tensor:
        """``LongTensor[n]``: the position of each sequence's language in :attr:`language_list`."""
        position = {lang: i for i, lang in enumerate(self.language_list)}
        return torch.tensor([position[lang] for lang in self.languages], dtype=torch.long)

    def select(self, languages: list[str]) -> CalibrationSet:
        """The sub-set of the given languages (in the order they appear here)."""
        languages = _normalize_tags(languages, "languages")
        missing = sorted(set(languages) - set(self.languages))
        if missing:
            raise ValueError(f"languages {missing} are not in this calibration set ({self.language_list})")
        keep = [i for i, lang in enumerate(self.languages) if lang in set(languages)]
        index = torch.tensor(keep, dtype=torch.long)
        return CalibrationSet(
            self.input_ids[index],
            self.attention_mask[index],
            [self.languages[i] for i in keep],
            {k: v for k, v in self.sources.items() if k in languages},
        )

    @classmethod
    def from_token_ids(cls, token_ids_by_language: Mapping[str, torch.Tensor]) -> CalibrationSet:
        """Build from ``{language: LongTensor[n, seq_len]}`` (every tensor the same ``seq_len``; no padding)."""
        if not token_ids_by_language:
            raise ValueError("the calibration mapping is empty: give at least one language")
        tensors, languages = [], []
        seq_len = None
        for lang, ids in token_ids_by_language.items():
            if not isinstance(ids, torch.Tensor):
                raise TypeError(f"calibration[{lang!r}] must be a LongTensor, got {type(ids).__name__}")
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
            if ids.dim() != 2:
                raise ValueError(f"calibration[{lang!r}] must be [n, seq_len], got shape {tuple(ids.shape)}")
            if ids.numel() == 0:
                raise ValueError(f"calibration language {lang!r} has no tokens")
            if seq_len is None:
                seq_len = ids.shape[1]
            elif ids.shape[1] != seq_len:
                raise ValueError(
                    f"calibration[{lang!r}] has seq_len {ids.shape[1]}, others {seq_len}: all must match"
                )
            tensors.append(ids.long())
            languages.extend([lang] * ids.shape[0])
        input_ids = torch.cat(tensors)
        return cls(input_ids, torch.ones_like(input_ids), languages)


def _normalize_tags(tags, what: str) -> list[str]:
    """Canonical tags of ``tags``; every invalid one named in one ``ValueError``."""
    normalized, errors = [], {}
    for tag in tags:
        try:
            normalized.append(normalize_language_tag(tag))
        except (TypeError, ValueError) as err:
            errors.setdefault(repr(tag), str(err))
    if errors:
        raise ValueError(
            f"{what}: invalid language tag(s) {', '.join(errors)}: {next(iter(errors.values()))}"
        )
    return normalized
