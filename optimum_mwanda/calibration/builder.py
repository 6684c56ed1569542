"""Build a :class:`CalibrationSet` from raw text by language: seeded sampling and packing."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from .dataset import CalibrationSet


def build_calibration(
    texts_by_language: Mapping[str, Sequence[str]],
    tokenizer,
    samples_per_language: int = 8,
    seq_len: int = 512,
    seed: int = 0,
    weights: Mapping[str, float] | None = None,
) -> CalibrationSet:
    """Tokenize, shuffle (seeded) and pack texts into ``seq_len``-token sequences, equal shares per language.

    Texts of one language are joined with the tokenizer's EOS token and cut into full sequences, so no
    padding is needed. ``weights`` (optional, relative) change the share of sequences per language.
    """
    if not texts_by_language:
        raise ValueError("texts_by_language is empty: give at least one language")
    if tokenizer is None:
        raise ValueError("calibration texts need a tokenizer: pass tokenizer=")
    shares = _sequences_per_language(list(texts_by_language), samples_per_language, weights)
    rng = random.Random(seed)
    input_ids: list[torch.Tensor] = []
    languages: list[str] = []
    for lang, texts in texts_by_language.items():
        if lang not in shares:
            continue
        if isinstance(texts, str):
            texts = [texts]
        texts = [t for t in texts if t and t.strip()]
        if not texts:
            raise ValueError(f"calibration language {lang!r} has no text")
        order = list(range(len(texts)))
        rng.shuffle(order)
        stream = _token_stream([texts[i] for i in order], tokenizer)
        wanted = shares[lang] * seq_len
        if len(stream) < wanted:
            raise ValueError(
                f"language {lang!r} has {len(stream)} tokens of text, fewer than the {wanted} needed for "
                f"{shares[lang]} sequences of {seq_len} tokens"
            )
        ids = torch.tensor(stream[:wanted], dtype=torch.long).view(shares[lang], seq_len)
        input_ids.append(ids)
        languages.extend([lang] * shares[lang])
    ids = torch.cat(input_ids)
    return CalibrationSet(ids, torch.ones_like(ids), languages)


def _sequences_per_language(
    languages: list[str], samples_per_language: int, weights: Mapping[str, float] | None
) -> dict[str, int]:
    if weights is None:
        return {lang: samples_per_language for lang in languages}
    unknown = sorted(set(weights) - set(languages))
    if unknown:
        raise ValueError(f"weights name languages without text: {unknown}")
    values = {lang: float(weights.get(lang, 0.0)) for lang in languages}
    if any(v < 0 for v in values.values()) or sum(values.values()) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    total = samples_per_language * len(languages)
    norm = sum(values.values())
    shares = {lang: round(total * v / norm) for lang, v in values.items()}
    return {lang: n for lang, n in shares.items() if n > 0}


def _token_stream(texts: Sequence[str], tokenizer) -> list[int]:
    separator = tokenizer.eos_token_id
    stream: list[int] = []
    if tokenizer.bos_token_id is not None:
        stream.append(tokenizer.bos_token_id)
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if separator is not None:
            stream.append(separator)
    return stream
