"""benchmarks/xcopa_study.py's report on made-up records: paired differences, chance test, partial runs."""

from __future__ import annotations

import json
import math

import pytest
from repo_scripts import load_script

xcopa = load_script("benchmarks/xcopa_study.py")
LANGS = xcopa.XCOPA_LANGUAGES
N = 100


def _record(correct: dict[str, set[int]], settings, prune_seconds=None) -> dict:
    tasks, samples = {}, {}
    for lang, docs in correct.items():
        p = len(docs) / N
        tasks[f"xcopa_{lang}"] = {"acc": p, "acc_stderr": math.sqrt(p * (1 - p) / (N - 1))}
        samples[f"xcopa_{lang}"] = N
    pooled = sum(len(d) for d in correct.values()) / (N * len(correct))
    tasks["xcopa"] = {"acc": pooled, "acc_stderr": 0.015}
    return {
        "settings": settings,
        "tasks": tasks,
        "samples": samples,
        "documents": {f"xcopa_{lang}": sorted(docs) for lang, docs in correct.items()},
        "prune_seconds": prune_seconds,
        "uptime": "load average: 9.0, 9.0, 9.0",
    }


def test_paired_difference():
    sizes = {"et": 4}
    a, b = {"et": {0, 1, 2}}, {"et": {0, 3}}
    diff, se = xcopa.paired_difference(a, b, sizes)
    # per item: +0, +1, +1, -1 -> mean 0.25, sd of (0, 1, 1, -1)
    d = [0, 1, 1, -1]
    mean = sum(d) / 4
    assert diff == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in d) / 3 / 4))
    assert xcopa.paired_difference(a, a, sizes) == (0.0, 0.0)


def test_report_states_chance_differences_and_what_is_missing(tmp_path):
    args = xcopa.build_parser().parse_args(["--output", str(tmp_path / "xcopa_study")])
    args.languages_eval = LANGS
    key = xcopa.settings_key(args)
    dense = {lang: set(range(70)) for lang in LANGS}  # 0.70 everywhere: far above chance
    dense["qu"] = set(range(50))  # Quechua at chance
    worse = {lang: set(range(50)) for lang in LANGS}  # 20 items fewer per language, the same items
    cache = {
        "results": {"dense": _record(dense, key), "wanda@50": _record(worse, key, 100.0)},
        "uptime": ["start: load average: 9.0"],
    }
    markdown = xcopa.write_report(cache, args, "python benchmarks/xcopa_study.py")
    assert (tmp_path / "xcopa_study.md").read_text() == markdown
    assert "| **pooled** |" in markdown and "| qu | 0.500 |" in markdown
    above = next(line for line in markdown.splitlines() if line.startswith("Languages more than 2"))
    assert "qu" not in above and "et" in above
    assert "| wanda@50 | dense | -0.182 |" in markdown  # (10 x 20) / 1100 fewer, paired
    assert "larger than twice their paired standard error: wanda@50 vs dense" in markdown
    assert "**Not finished**" in markdown and "sparsegpt@50" in markdown
    json.dumps(cache)  # records stay JSON
