"""Translation demonstrations as calibration text (Kim et al.): k-shot parallel examples per language pair.

From a parallel corpus ``{language: [sentence_0, sentence_1, ...]}`` (index ``i`` is one sentence in every
language, e.g. FLORES+ from :func:`~optimum_mwanda.calibration.loaders.load_flores`), each demonstration is
``k`` translation examples in a row::

    English: The cat sleeps.</s>German: Die Katze schläft.</s>English: ...</s>German: ...</s>

Demonstrations are keyed by their *target* language, ready for :func:`build_calibration`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from .languages import language_name, normalize_language_tag


def render_demonstration(
    examples: Sequence[tuple[str, str]], source_name: str, target_name: str, eos: str
) -> str:
    """``"{Source}: {src}{eos}{Target}: {tgt}{eos}"`` for each ``(src, tgt)`` example, concatenated."""
    return "".join(f"{source_name}: {src}{eos}{target_name}: {tgt}{eos}" for src, tgt in examples)


def default_pairs(
    languages: Sequence[str], pivot: str = "en", directions: str = "both"
) -> list[tuple[str, str]]:
    """``(source, target)`` pairs between ``pivot`` and every other language.

    ``directions``: ``"both"`` (pivot -> X and X -> pivot), ``"from_pivot"`` or ``"to_pivot"``.
    """
    if directions not in ("both", "from_pivot", "to_pivot"):
        raise ValueError(f"directions must be 'both', 'from_pivot' or 'to_pivot', got {directions!r}")
    others = [lang for lang in languages if lang != pivot]
    pairs: list[tuple[str, str]] = []
    for lang in others:
        if directions in ("both", "from_pivot"):
            pairs.append((pivot, lang))
        if directions in ("both", "to_pivot"):
            pairs.append((lang, pivot))
    return pairs


def translation_demonstrations(
    parallel: Mapping[str, Sequence[str]],
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    pivot: str = "en",
    directions: str = "both",
    shots: int = 4,
    demonstrations_per_pair: int | None = None,
    eos: str | None = None,
    tokenizer=None,
    names: Mapping[str, str] | None = None,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Render seeded k-shot translation demonstrations from an index-aligned parallel corpus.

    Args:
        parallel: ``{language: sentences}``; every list has the same length and index ``i`` is the same
            sentence in every language (empty sentences are skipped for the pairs that need them).
        pairs: ``(source, target)`` language pairs; default: ``pivot`` <-> every other language.
        pivot, directions: the default pairs (see :func:`default_pairs`).
        shots: translation examples per demonstration (``k``); the examples of one demonstration differ.
        demonstrations_per_pair: demonstrations per pair; default: as many as use each aligned sentence once
            (``len(sentences) // shots``). More than that reuse sentences in a new seeded order.
        eos: the string after every sentence; default the tokenizer's EOS token when ``tokenizer`` is given,
            else a newline.
        names: display names overriding the built-in English names (``{"sw": "Kiswahili"}``).
        seed: the same seed gives the same demonstrations.

    Returns:
        ``{target language: [demonstration, ...]}`` in the order of first appearance of each target.
    """
    if not isinstance(parallel, Mapping) or not parallel:
        raise ValueError("parallel must be a non-empty mapping {language: [sentence, ...]}")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive integer, got {shots!r}")
    if demonstrations_per_pair is not None and (
        isinstance(demonstrations_per_pair, bool)
        or not isinstance(demonstrations_per_pair, int)
        or demonstrations_per_pair < 1
    ):
        raise ValueError(
            f"demonstrations_per_pair must be a positive integer, got {demonstrations_per_pair!r}"
        )
    corpus = {normalize_language_tag(lang): list(sentences) for lang, sentences in parallel.items()}
    lengths = {lang: len(sentences) for lang, sentences in corpus.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the parallel corpus is not aligned: sentence counts differ per language {lengths}")
    pivot = normalize_language_tag(pivot)
    if pairs is None:
        if pivot not in corpus:
            raise ValueError(f"the pivot language {pivot!r} is not in the parallel corpus ({sorted(corpus)})")
        pairs = default_pairs(list(corpus), pivot, directions)
        if not pairs:
            raise ValueError("the parallel corpus needs at least two languages")
    else:
        pairs = [(normalize_language_tag(s), normalize_language_tag(t)) for s, t in pairs]
        missing = sorted({lang for pair in pairs for lang in pair} - set(corpus))
        if missing:
            raise ValueError(
                f"pairs name languages {missing} that are not in the parallel corpus ({sorted(corpus)})"
            )
        same = [pair for pair in pairs if pair[0] == pair[1]]
        if same:
            raise ValueError(f"a translation pair needs two different languages, got {same}")
    display = {lang: language_name(lang, dict(names) if names else None) for pair in pairs for lang in pair}
    if eos is None:
        eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else "\n"
        if eos is None:
            raise ValueError("the tokenizer has no EOS token: pass eos= (the separator after each sentence)")

    result: dict[str, list[str]] = {}
    for source, target in pairs:
        usable = [
            i
            for i, (s, t) in enumerate(zip(corpus[source], corpus[target]))
            if s and s.strip() and t and t.strip()
        ]
        if len(usable) < shots:
            raise ValueError(
                f"{source}->{target} has {len(usable)} aligned sentence pairs, fewer than shots={shots}"
            )
        count = demonstrations_per_pair or len(usable) // shots
        rng = random.Random(f"{seed}:{source}->{target}")
        order: list[int] = []
        demos = []
        for _ in range(count):
            if len(order) < shots:
                # A fresh seeded permutation whenever the current one cannot fill a demonstration.
                order = usable[:]
                rng.shuffle(order)
            chosen, order = order[:shots], order[shots:]
            examples = [(corpus[source][i].strip(), corpus[target][i].strip()) for i in chosen]
            demos.append(render_demonstration(examples, display[source], display[target], eos))
        result.setdefault(target, []).extend(demos)
    return result
