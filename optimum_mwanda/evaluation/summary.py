"""Summaries of per-language perplexity: the one mean the package reports, and the plain-text table.

The mean over languages is the *geometric* mean everywhere (``optimum-mwanda eval``, the model card, the
examples and the benchmarks): perplexities of different languages differ by orders of magnitude, and an
arithmetic mean would be dominated by the worst language. It is labelled "geometric mean" wherever shown.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

MEAN_LABEL = "geometric mean"


def geometric_mean(values: Iterable[float]) -> float:
    """``exp(mean(log v))``; ``nan`` when there is no value or any is not a positive finite number."""
    values = list(values)
    if not values or any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in values):
        return math.nan
    return math.exp(sum(math.log(v) for v in values) / len(values))


def format_perplexity_table(
    columns: Mapping[str, Mapping[str, float]],
    languages: Sequence[str],
    extra_rows: Mapping[str, Mapping[str, float]] | None = None,
) -> str:
    """One row per language, one column per model, then their geometric mean over ``languages``.

    ``extra_rows`` (e.g. ``{"sparsity": {model: 0.5}}``) are appended after the mean, shown with 3 decimals.
    A missing value shows as ``nan``.
    """
    names = list(columns)
    label_width = max(10, len(MEAN_LABEL) + 2, *(len(lang) + 2 for lang in languages))
    width = max(10, *(len(n) for n in names)) + 2
    lines = ["language".ljust(label_width) + "".join(n.rjust(width) for n in names)]
    lines.append("-" * len(lines[0]))
    for lang in languages:
        cells = (f"{columns[n].get(lang, math.nan):.2f}".rjust(width) for n in names)
        lines.append(lang.ljust(label_width) + "".join(cells))
    means = (geometric_mean(columns[n].get(lang, math.nan) for lang in languages) for n in names)
    lines.append(MEAN_LABEL.ljust(label_width) + "".join(f"{m:.2f}".rjust(width) for m in means))
    for label, row in (extra_rows or {}).items():
        lines.append(
            label.ljust(label_width) + "".join(f"{row.get(n, math.nan):.3f}".rjust(width) for n in names)
        )
    return "\n".join(lines)
