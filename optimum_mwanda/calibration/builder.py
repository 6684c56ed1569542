"""Build a :class:`CalibrationSet` from raw text by language: seeded shuffling, packing, per-language shares.

Packing: the texts of one language are shuffled (seeded), tokenized without special tokens, each followed by
the tokenizer's EOS token, and the resulting token stream is cut into consecutive ``seq_len``-token
sequences. Every sequence starts with BOS when the tokenizer itself adds BOS (Llama, Gemma, ...), so each
calibration sequence looks like a real model input. Only as much text as needed is tokenized.

Too little text: by default a language whose text cannot fill its sequences raises ``ValueError`` with the
token counts (have / need). With ``allow_padding=True`` the language instead gets as many sequences as its
text fills, the last one right-padded; padding has ``attention_mask == 0`` and is never counted in
:attr:`CalibrationSet.token_counts`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .dataset import CalibrationSet
from .languages import normalize_language_keys

# Texts are tokenized in small batches, in shuffled order, until a language has enough tokens.
_TOKENIZE_BATCH = 32


def build_calibration(
    texts_by_language: Mapping[str, str | Iterable[str]],
    tokenizer,
    samples_per_language: int = 8,
    seq_len: int = 512,
    seed: int = 0,
    weights: Mapping[str, float] | None = None,
    *,
    sources: Mapping[str, str] | None = None,
    allow_padding: bool = False,
    add_bos: bool | None = None,
) -> CalibrationSet:
    """Tokenize, shuffle (seeded) and pack texts into ``seq_len``-token sequences, with a share per language.

    Args:
        texts_by_language: ``{language tag: texts}`` (a string counts as one text). Tags are BCP-47-like
            (``"de"``, ``"sw"``, ``"zh-Hans"``, ``"pt-BR"``) and are returned in canonical case.
        tokenizer: a Hugging Face tokenizer. Its EOS token separates packed texts (required when a language has
            more than one text).
        samples_per_language: sequences per language with equal shares; with ``weights``, the total
            ``samples_per_language * len(texts_by_language)`` is split in proportion to the weights.
        seq_len: tokens per sequence (BOS included).
        seed: the same seed gives the same sequences; each language's order depends only on the seed and the
            language tag, so adding a language does not change the others.
        weights: optional relative weights, one for every language; ``0`` leaves a language out, and every
            positive weight gets at least one sequence.
        sources: optional ``{language: corpus name}`` stored in :attr:`CalibrationSet.sources`.
        allow_padding: when a language's text cannot fill its sequences, pad its last sequence (masked, never
            counted) instead of raising ``ValueError``.
        add_bos: start every sequence with BOS; default ``None`` follows the tokenizer (whether it adds BOS to
            ``tokenizer("text")``).

    Returns:
        A :class:`CalibrationSet` with the languages in the order of ``texts_by_language``.
    """
    _check_positive_int("samples_per_language", samples_per_language)
    _check_positive_int("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if tokenizer is None:
        raise ValueError("calibration texts need a tokenizer: pass tokenizer=")
    if not callable(tokenizer):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}"
        )
    texts = _normalize_texts(texts_by_language)
    shares = allocate_sequences(
        list(texts),
        samples_per_language * len(texts),
        None if weights is None else normalize_language_keys(weights, "weights"),
    )
    eos = getattr(tokenizer, "eos_token_id", None)
    packed = [lang for lang in shares if len(texts[lang]) > 1]
    if eos is None and packed:
        raise ValueError(
            f"the tokenizer has no EOS token, which separates packed texts (languages {packed} have several "
            "texts): set tokenizer.eos_token, or join each language's text into one string"
        )
    bos = _bos_token_id(tokenizer, add_bos)
    body_len = seq_len - (1 if bos is not None else 0)
    if body_len < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after the BOS token")
    pad = next((t for t in (getattr(tokenizer, "pad_token_id", None), eos) if t is not None), 0)

    all_ids: list[torch.Tensor] = []
    all_masks: list[torch.Tensor] = []
    languages: list[str] = []
    for lang, n_sequences in shares.items():
        order = list(range(len(texts[lang])))
        random.Random(f"{seed}:{lang}").shuffle(order)
        needed = n_sequences * body_len
        stream = _token_stream((texts[lang][i] for i in order), tokenizer, eos, needed)
        if len(stream) < needed:
            if not allow_padding:
                raise ValueError(
                    f"language {lang!r} has {len(stream)} tokens of text ({len(texts[lang])} texts), but "
                    f"{n_sequences} sequences of {seq_len} tokens need {needed} text tokens"
                    f"{' (plus one BOS each)' if bos is not None else ''}: give more text, lower "
                    "samples_per_language or seq_len, or pass allow_padding=True"
                )
            n_sequences = math.ceil(len(stream) / body_len)
        ids, mask = pack_sequences(stream[:needed], n_sequences, seq_len, bos, pad)
        all_ids.append(ids)
        all_masks.append(mask)
        languages.extend([lang] * n_sequences)
    known_sources = {k: str(v) for k, v in normalize_language_keys(sources or {}, "sources").items()}
    return CalibrationSet(
        torch.cat(all_ids),
        torch.cat(all_masks),
        languages,
        {lang: known_sources[lang] for lang in shares if lang in known_sources},
        # The seed decides which text windows were drawn; seq_len and the per-language counts are read
        # off the tensors (CalibrationSet.settings).
        build_settings={"seed": seed},
    )


def default_calibration(
    tokenizer,
    languages: str | Sequence[str] | None = None,
    samples_per_language: int = 8,
    seq_len: int = 512,
    seed: int = 0,
) -> CalibrationSet:
    """A calibration set from the bundled sample corpus (all its languages by default), sources recorded.

    Every bundled language has at least ~19k tokens of calibration text (Gemma 3 tokenizer), enough for the
    default 8 sequences of 512 tokens.
    """
    from .corpus import bundled_corpus_sources, load_bundled_corpus

    texts = load_bundled_corpus("calibration", languages)
    return build_calibration(
        texts,
        tokenizer,
        samples_per_language=samples_per_language,
        seq_len=seq_len,
        seed=seed,
        sources=bundled_corpus_sources(),
    )


# ---------------------------------------------------------------------------------------------------------
# small pure helpers
# ---------------------------------------------------------------------------------------------------------
def allocate_sequences(
    languages: Sequence[str], total: int, weights: Mapping[str, float] | None = None
) -> dict[str, int]:
    """Split ``total`` sequences over ``languages``: equal shares, or in proportion to ``weights``.

    Proportional shares use the largest-remainder method (ties go to the earlier language), so they sum to
    ``total``; a language with a positive weight gets at least one sequence, one with weight ``0`` none.
    """
    if not languages:
        raise ValueError("no languages to calibrate on")
    if weights is None:
        per_language, remainder = divmod(total, len(languages))
        return {lang: per_language + (1 if i < remainder else 0) for i, lang in enumerate(languages)}
    unknown = [lang for lang in weights if lang not in languages]
    if unknown:
        raise ValueError(f"weights name languages without text: {unknown} (languages: {list(languages)})")
    missing = [lang for lang in languages if lang not in weights]
    if missing:
        raise ValueError(
            f"weights give no weight for {missing}: give every language a weight (0 leaves it out)"
        )
    values: dict[str, float] = {}
    for lang in languages:
        value = weights[lang]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"weights[{lang!r}] must be a finite number >= 0, got {value!r}")
        values[lang] = float(value)
    norm = sum(values.values())
    if norm <= 0:
        raise ValueError("weights must have a positive sum")
    exact = {lang: total * v / norm for lang, v in values.items()}
    shares = {lang: math.floor(x) for lang, x in exact.items()}
    left = total - sum(shares.values())
    by_remainder = sorted(languages, key=lambda lang: (-(exact[lang] - shares[lang]), languages.index(lang)))
    for lang in by_remainder[:left]:
        shares[lang] += 1
    for lang in languages:
        if values[lang] > 0 and shares[lang] == 0:
            shares[lang] = 1
    return {lang: n for lang, n in shares.items() if n > 0}


def pack_sequences(
    stream: Sequence[int], n_sequences: int, seq_len: int, bos: int | None, pad: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream into ``n_sequences`` rows of ``seq_len`` (each led by ``bos`` when given).

    A stream too short for the last row is right-padded with ``pad``; padded positions have mask ``0``.
    """
    body_len = seq_len - (1 if bos is not None else 0)
    ids = torch.full((n_sequences, seq_len), pad, dtype=torch.long)
    mask = torch.zeros((n_sequences, seq_len), dtype=torch.long)
    start_col = 0
    if bos is not None:
        ids[:, 0] = bos
        mask[:, 0] = 1
        start_col = 1
    for row in range(n_sequences):
        chunk = stream[row * body_len : (row + 1) * body_len]
        if len(chunk) == 0:
            raise ValueError(
                f"the token stream ({len(stream)} tokens) is too short for {n_sequences} sequences"
            )
        ids[row, start_col : start_col + len(chunk)] = torch.as_tensor(list(chunk), dtype=torch.long)
        mask[row, start_col : start_col + len(chunk)] = 1
    return ids, mask


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _normalize_texts(texts_by_language: Mapping[str, str | Iterable[str]]) -> dict[str, list[str]]:
    """Canonical tags -> non-empty texts; errors name the offending language."""
    if not isinstance(texts_by_language, Mapping):
        raise TypeError(
            "texts_by_language must be a mapping {language: [text, ...]}, got "
            f"{type(texts_by_language).__name__}"
        )
    if not texts_by_language:
        raise ValueError("texts_by_language is empty: give at least one language")
    texts: dict[str, list[str]] = {}
    for lang, values in normalize_language_keys(texts_by_language, "calibration texts").items():
        if isinstance(values, str):
            values = [values]
        items = list(values)
        bad = next((t for t in items if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts of language {lang!r} must be strings, found {type(bad).__name__}")
        kept = [t for t in items if t.strip()]
        if not kept:
            raise ValueError(f"calibration language {lang!r} has no text")
        texts[lang] = kept
    return texts


def _bos_token_id(tokenizer, add_bos: bool | None) -> int | None:
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos is None:
        # Follow the tokenizer: GPT-2 style tokenizers have a BOS token but never add it.
        return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None
    if add_bos and bos is None:
        raise ValueError("add_bos=True but the tokenizer has no BOS token")
    return bos if add_bos else None


def _token_stream(texts: Iterable[str], tokenizer, eos: int | None, needed: int) -> list[int]:
    """Token ids of ``texts`` (each followed by EOS when there is one), until ``needed`` ids are collected."""
    stream: list[int] = []
    batch: list[str] = []
    iterator = iter(texts)
    while len(stream) < needed:
        batch = [t for _, t in zip(range(_TOKENIZE_BATCH), iterator)]
        if not batch:
            break
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
    return stream


def resolve_calibration(
    calibration: CalibrationSet | Mapping[str, Any] | None,
    tokenizer,
    *,
    samples_per_language: int,
    seq_len: int,
    seed: int,
    what: str = "calibration",
) -> CalibrationSet:
    """Turn what a user passes as calibration into a :class:`CalibrationSet`.

    ``calibration`` is a :class:`CalibrationSet` (used as it is), ``{language: LongTensor}`` of token ids,
    ``{language: texts}`` (packed by :func:`build_calibration` with ``samples_per_language``, ``seq_len``
    and ``seed``; needs ``tokenizer``) or ``None`` (the bundled corpus, needs ``tokenizer``). ``what`` names
    the argument in error messages.
    """
    if isinstance(calibration, CalibrationSet):
        return calibration
    packing = {"samples_per_language": samples_per_language, "seq_len": seq_len, "seed": seed}
    if calibration is None:
        if tokenizer is None:
            raise ValueError(
                f"{what} is None and no tokenizer was given: pass token ids, or texts and a tokenizer"
            )
        return default_calibration(tokenizer, **packing)
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
            {k: [v] if isinstance(v, str) else list(v) for k, v in calibration.items()}, tokenizer, **packing
        )
    raise TypeError(f"{what} values must all be LongTensors of token ids or all be lists of strings")
